//! The delta codec's settings (top-k, per-block top-k, value format, scale format, block size) as
//! `mana simulate`, `mana coordinator` and `mana demo` take them: one set of flags, one TOML section, one
//! resolution into the [`CodecOptions`] a round announces. The codec itself is `mana_protocol::codec`.

use anyhow::Context;
use clap::{Args, ValueEnum};
use mana_protocol::{CodecOptions, ScaleFormat, ValueFormat};
use serde::Deserialize;

use crate::config::{Layered, parse_bool};

/// `--values`: how each sent value of a delta is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Values {
    /// FP8 E4M3 (8 bits), the block's amax mapped to 448.
    Fp8,
    /// 4 bits: sign and 8 magnitude levels relative to the block's amax (needs --top-k-per-block or no
    /// top-k).
    Int4,
    /// 2 bits: sign and 2 magnitude levels relative to the kept values' mean (needs --top-k-per-block).
    Int2,
}

impl From<Values> for ValueFormat {
    fn from(v: Values) -> ValueFormat {
        match v {
            Values::Fp8 => ValueFormat::Fp8,
            Values::Int4 => ValueFormat::Int4,
            Values::Int2 => ValueFormat::Int2,
        }
    }
}

/// The codec flags (and, for the coordinator, the same keys in its TOML file). Every field is optional, so
/// that flags can be layered over a file; unset fields keep the codec's defaults (dense FP8, f32 scales,
/// blocks of 128).
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CodecArgs {
    /// Send only this fraction of each delta's values (top-k by magnitude, with error feedback): over the
    /// whole delta, or in each block with --top-k-per-block.
    #[arg(long, env = "MANA_TOP_K")]
    pub top_k: Option<f32>,
    /// Take the top-k in each block of --block-size positions (7- or 8-bit positions instead of 32-bit
    /// indices; SparseLoCo's chunked top-k). Needs --top-k.
    #[arg(long, env = "MANA_TOP_K_PER_BLOCK", value_parser = parse_bool, num_args = 0..=1,
          default_missing_value = "true")]
    pub top_k_per_block: Option<bool>,
    /// How each sent value is quantized: fp8 (default), or int4 / int2 (SparseLoCo) with --top-k-per-block.
    /// With int2 or int4 and per-block top-k, the outer optimizer defaults to lr 1 and momentum 0 (error
    /// feedback takes the place of momentum).
    #[arg(long, env = "MANA_VALUES", value_enum)]
    pub values: Option<Values>,
    /// Store block scales as powers of two (1 byte) instead of f32.
    #[arg(long, env = "MANA_POW2_SCALES", value_parser = parse_bool, num_args = 0..=1,
          default_missing_value = "true")]
    pub pow2_scales: Option<bool>,
    /// Values per scale block: 128 or 256.
    #[arg(long, env = "MANA_BLOCK_SIZE")]
    pub block_size: Option<u16>,
}

impl CodecArgs {
    /// The codec options these settings describe (flags over file), checked as a round would check them.
    pub fn resolve(layers: &Layered<&CodecArgs>) -> anyhow::Result<CodecOptions> {
        let mut codec = CodecOptions {
            top_k_density: layers.get(|a| &a.top_k),
            top_k_per_block: layers.get(|a| &a.top_k_per_block).unwrap_or(false),
            ..CodecOptions::default()
        };
        if let Some(v) = layers.get(|a| &a.values) {
            codec.values = v.into();
        }
        if layers.get(|a| &a.pow2_scales).unwrap_or(false) {
            codec.scale = ScaleFormat::PowerOfTwo;
        }
        if let Some(b) = layers.get(|a| &a.block_size) {
            codec.block_size = b;
        }
        codec.check().context("codec options")?;
        Ok(codec)
    }

    /// These settings alone (no file), for commands without one.
    pub fn options(&self) -> anyhow::Result<CodecOptions> {
        CodecArgs::resolve(&Layered {
            flags: self,
            file: &CodecArgs::default(),
        })
    }

    /// The flags that give a child process these settings (the demo passes them to its coordinator).
    pub fn to_flags(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(k) = self.top_k {
            out.extend(["--top-k".into(), k.to_string()]);
        }
        if let Some(b) = self.top_k_per_block {
            out.push(format!("--top-k-per-block={b}"));
        }
        if let Some(v) = self.values {
            let name = v.to_possible_value().map(|p| p.get_name().to_owned());
            out.extend(["--values".into(), name.unwrap_or_default()]);
        }
        if let Some(p) = self.pow2_scales {
            out.push(format!("--pow2-scales={p}"));
        }
        if let Some(b) = self.block_size {
            out.extend(["--block-size".into(), b.to_string()]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        codec: CodecArgs,
    }

    fn parse(args: &[&str]) -> anyhow::Result<CodecOptions> {
        let cli = Cli::try_parse_from(std::iter::once("mana").chain(args.iter().copied()))?;
        cli.codec.options()
    }

    #[test]
    fn flags_make_the_codec_options_and_refuse_what_the_codec_refuses() {
        assert_eq!(parse(&[]).expect("no flags"), CodecOptions::default());
        let sparse = parse(&[
            "--top-k",
            "0.03",
            "--top-k-per-block",
            "--values",
            "int2",
            "--pow2-scales",
        ])
        .expect("SparseLoCo's settings");
        assert_eq!(sparse.top_k_density, Some(0.03));
        assert!(sparse.top_k_per_block && sparse.is_sparse_low_bit());
        assert_eq!(sparse.values, ValueFormat::Int2);
        assert_eq!(sparse.scale, ScaleFormat::PowerOfTwo);
        // Per-block top-k needs a density; int2 needs top-k.
        assert!(parse(&["--top-k-per-block"]).is_err());
        assert!(parse(&["--values", "int2"]).is_err());
        assert!(parse(&["--top-k", "2"]).is_err());
        assert!(parse(&["--block-size", "100"]).is_err());
    }

    #[test]
    fn to_flags_gives_a_child_the_same_options() {
        let cli = Cli::try_parse_from([
            "mana",
            "--top-k",
            "0.01",
            "--top-k-per-block",
            "--values",
            "int4",
            "--block-size",
            "256",
        ])
        .expect("valid flags");
        let flags = cli.codec.to_flags();
        let again = Cli::try_parse_from(std::iter::once("mana".to_owned()).chain(flags))
            .expect("to_flags parses");
        assert_eq!(
            again.codec.options().expect("again valid"),
            cli.codec.options().expect("valid")
        );
    }

    #[test]
    fn the_file_fills_what_the_flags_leave() {
        let file: CodecArgs =
            toml::from_str("top_k = 0.03\ntop_k_per_block = true\nvalues = \"int2\"\n")
                .expect("the file");
        let flags = Cli::try_parse_from(["mana", "--values", "int4"])
            .expect("the flags")
            .codec;
        let codec = CodecArgs::resolve(&Layered {
            flags: &flags,
            file: &file,
        })
        .expect("flags over file");
        assert_eq!(codec.values, ValueFormat::Int4);
        assert_eq!(codec.top_k_density, Some(0.03));
        assert!(codec.top_k_per_block);
    }
}
