//! One layering of settings for every command: **flag > `MANA_*` environment variable > TOML file > default.**
//!
//! clap already gives a flag precedence over its `MANA_*` variable (`#[arg(long, env = "MANA_X")]`) and writes
//! both into `--help`, so a command's settings are one clap `Args` struct of `Option`s. The same struct, by the
//! same field names, is what the command's TOML file holds: [`FileTable`] reads it (the one place that reads a
//! TOML file: at most 1 MiB, unknown keys refused) and [`Layered`] puts the flags' values over the file's. The
//! defaults are what the command falls back to when [`Layered::get`] finds nothing.
//!
//! A struct shared by several commands (the network settings) is a clap `#[command(flatten)]` field marked
//! `#[serde(skip)]`, and its keys are taken from the same file table with [`FileTable::take`]. (serde's own
//! `flatten` would do that in one derive, but it cannot refuse unknown keys, and its errors lose the key's name.)

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};

/// Largest config file read: a real one is a few hundred bytes, anything this big is a mistake.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be opened or read.
    #[error("{path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said (in the message, so not also a `source`).
        error: std::io::Error,
    },
    /// The file is over [`MAX_CONFIG_BYTES`].
    #[error("{path}: larger than 1 MiB")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file is not TOML, or a key holds a value of the wrong kind (the message names the key).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message.
        message: String,
    },
    /// The file has a key that no setting of the command reads.
    #[error("{path}: unknown key `{key}` (this command's keys: {known})")]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The first unknown key.
        key: String,
        /// Every key the command reads, comma-separated.
        known: String,
    },
}

/// Reads a TOML file of at most [`MAX_CONFIG_BYTES`] into a table: the only function that reads a config
/// file, so every command has the same bound and the same messages. The keys are checked by whoever reads
/// the table (see [`FileTable`]).
pub fn read_toml(path: &Path) -> Result<toml::Table, ConfigError> {
    let read_err = |error| ConfigError::Read {
        path: path.to_owned(),
        error,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut text = String::new();
    // One byte past the bound tells "exactly 1 MiB" from "more", without trusting the file's metadata.
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
        });
    }
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// A command's TOML file, read and being taken apart: each settings struct takes its own keys
/// ([`FileTable::take`]), and [`FileTable::finish`] refuses whatever key none of them took.
#[derive(Debug)]
pub struct FileTable {
    path: PathBuf,
    table: toml::Table,
    known: Vec<&'static str>,
}

impl FileTable {
    /// Reads the file (see [`read_toml`]).
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        Ok(Self::from_table(path, read_toml(path)?))
    }

    /// Wraps a table already read; `path` names it in errors.
    pub fn from_table(path: &Path, table: toml::Table) -> Self {
        Self {
            path: path.to_owned(),
            table,
            known: Vec::new(),
        }
    }

    /// Takes the keys that `T` (a struct deriving `Deserialize`) reads out of the table and parses them.
    /// Keys it lacks are left for the next struct, so `T` may be `#[serde(deny_unknown_fields)]`.
    pub fn take<T: DeserializeOwned>(&mut self) -> Result<T, ConfigError> {
        let keys = struct_keys::<T>();
        self.known.extend_from_slice(keys);
        let mut mine = toml::Table::new();
        for key in keys {
            if let Some(value) = self.table.remove(*key) {
                mine.insert((*key).to_owned(), value);
            }
        }
        mine.try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: self.path.clone(),
                message: e.to_string().trim_end().replace('\n', " "),
            })
    }

    /// Refuses the file if a key was taken by no struct (a typo must not be silently ignored).
    pub fn finish(self) -> Result<(), ConfigError> {
        match self.table.keys().next() {
            None => Ok(()),
            Some(key) => {
                let mut known = self.known;
                known.sort_unstable();
                Err(ConfigError::UnknownKey {
                    path: self.path,
                    key: key.clone(),
                    known: known.join(", "),
                })
            }
        }
    }
}

/// The settings as clap read them (flags, else `MANA_*` variables) and as the TOML file holds them: the same
/// struct twice, so every setting has one name in every source.
#[derive(Debug, Clone, Default)]
pub struct Layered<T> {
    /// What the command line and the environment set.
    pub flags: T,
    /// What the file set (all `None` without a file).
    pub file: T,
}

impl<T> Layered<T> {
    /// The flags' (or environment's) value of a setting if they set it, else the file's.
    pub fn get<V: Clone>(&self, setting: impl Fn(&T) -> &Option<V>) -> Option<V> {
        setting(&self.flags)
            .clone()
            .or_else(|| setting(&self.file).clone())
    }

    /// The layers of one part of the settings (a flattened struct), to resolve it on its own.
    pub fn section<S>(&self, part: impl Fn(&T) -> &S) -> Layered<&S> {
        Layered {
            flags: part(&self.flags),
            file: part(&self.file),
        }
    }
}

impl<T: FromFile> Layered<T> {
    /// Puts `flags` (what clap read) over the TOML file at `path` (over nothing without one).
    pub fn load(flags: T, path: Option<&Path>) -> Result<Self, ConfigError> {
        Ok(Self {
            flags,
            file: load_file(path)?,
        })
    }
}

/// A command's settings struct, as its TOML file fills it: it takes its own keys and those of the shared
/// structs it flattens from the file ([`FileTable::take`] each).
pub trait FromFile: Default {
    /// Takes this command's settings out of the file's table.
    fn from_file(file: &mut FileTable) -> Result<Self, ConfigError>;
}

/// Reads a command's TOML file at `path` (every setting unset without one), refusing keys the command does
/// not read.
pub fn load_file<T: FromFile>(path: Option<&Path>) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let mut file = FileTable::read(path)?;
    let settings = T::from_file(&mut file)?;
    file.finish()?;
    Ok(settings)
}

/// Parses a boolean flag's `MANA_*` variable: `1`, `true`, `yes`, `on` or `0`, `false`, `no`, `off` (any
/// case). Use as `#[arg(long, env = "MANA_X", value_parser = config::parse_bool)]` on a `bool` flag.
pub fn parse_bool(value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err("expected 1, true, yes, on, 0, false, no or off".into()),
    }
}

/// The names of the fields a derived `Deserialize` struct reads (serde's derive hands them to
/// `deserialize_struct`); empty for anything that is not a struct.
fn struct_keys<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut keys: &'static [&'static str] = &[];
    // The probe always fails after noting the names; its error carries nothing.
    let _ = T::deserialize(KeyProbe(&mut keys));
    keys
}

/// A deserializer that only records the field names it is asked for.
struct KeyProbe<'a>(&'a mut &'static [&'static str]);

impl<'de> Deserializer<'de> for KeyProbe<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("field names noted"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Clone, PartialEq, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Outer {
        name: Option<String>,
        count: Option<u32>,
        #[serde(skip)]
        inner: Inner,
    }

    #[derive(Debug, Default, Clone, PartialEq, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Inner {
        list: Option<Vec<String>>,
        table: Option<Limits>,
    }

    #[derive(Debug, Default, Clone, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Limits {
        most: u32,
    }

    fn parse(text: &str) -> Result<Outer, ConfigError> {
        let mut file = FileTable::from_table(
            Path::new("x.toml"),
            toml::from_str(text).expect("valid TOML"),
        );
        let mut outer: Outer = file.take()?;
        outer.inner = file.take()?;
        file.finish()?;
        Ok(outer)
    }

    #[test]
    fn every_struct_takes_its_keys_and_a_stray_key_is_refused() {
        let outer = parse("name = \"a\"\nlist = [\"x\"]\n[table]\nmost = 3\n").expect("valid");
        assert_eq!(outer.name.as_deref(), Some("a"));
        assert_eq!(outer.count, None);
        assert_eq!(outer.inner.list, Some(vec!["x".to_owned()]));
        assert_eq!(outer.inner.table, Some(Limits { most: 3 }));

        let err = parse("name = \"a\"\nlsit = []\n")
            .expect_err("typo refused")
            .to_string();
        assert_eq!(
            err,
            "x.toml: unknown key `lsit` (this command's keys: count, list, name, table)"
        );
    }

    #[test]
    fn a_wrong_value_is_refused_with_its_key() {
        let err = parse("count = \"many\"")
            .expect_err("a string is not a count")
            .to_string();
        assert!(
            err.starts_with("x.toml: ") && err.contains("`count`"),
            "{err}"
        );
        let err = parse("[table]\nmost = 1\nleast = 0\n")
            .expect_err("unknown key in a table")
            .to_string();
        assert!(err.contains("least") && err.contains("table"), "{err}");
        let err = parse("list = 3").expect_err("not a list").to_string();
        assert!(err.contains("`list`"), "{err}");
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_nothing() {
        let flags = Outer {
            name: Some("flag".into()),
            ..Outer::default()
        };
        let file = Outer {
            name: Some("file".into()),
            count: Some(7),
            ..Outer::default()
        };
        let layered = Layered { flags, file };
        assert_eq!(layered.get(|s| &s.name).as_deref(), Some("flag"));
        assert_eq!(layered.get(|s| &s.count), Some(7));
        assert_eq!(layered.get(|s| &s.inner.list), None);
    }

    #[test]
    fn the_file_is_bounded_and_must_be_toml() {
        let dir = tempfile::tempdir().expect("temp dir");
        let exact = dir.path().join("exact.toml");
        let comment = format!("#{}\n", "x".repeat(MAX_CONFIG_BYTES as usize - 2));
        std::fs::write(&exact, &comment).expect("write");
        assert!(read_toml(&exact).expect("1 MiB is allowed").is_empty());
        let big = dir.path().join("big.toml");
        std::fs::write(&big, format!("{comment} ")).expect("write");
        assert!(matches!(read_toml(&big), Err(ConfigError::TooLarge { .. })));
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "name = ").expect("write");
        assert!(matches!(read_toml(&bad), Err(ConfigError::Parse { .. })));
        assert!(matches!(
            read_toml(&dir.path().join("absent.toml")),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn boolean_variables_take_the_usual_spellings() {
        for yes in ["1", "true", "yes", "on", "TRUE", "On"] {
            assert_eq!(parse_bool(yes), Ok(true), "{yes}");
        }
        for no in ["0", "false", "no", "off", "NO"] {
            assert_eq!(parse_bool(no), Ok(false), "{no}");
        }
        for bad in ["", "2", "y", "enable"] {
            assert!(parse_bool(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn struct_keys_are_the_serde_field_names() {
        assert_eq!(struct_keys::<Outer>(), &["name", "count"]);
        assert_eq!(struct_keys::<Inner>(), &["list", "table"]);
        assert!(struct_keys::<u32>().is_empty());
    }
}
