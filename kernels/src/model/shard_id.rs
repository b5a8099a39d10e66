//! [`ShardId`]: the one name of a shard everywhere in mana — what the model indexes its parameters by, what a
//! checkpoint file is named after, what a message on the wire carries. It lives here, at the bottom of the
//! stack, so that the model, the protocol, the engine and the daemon all share one type and never convert.
//!
//! Every value is in bounds: the checked constructor [`ShardId::expert`], [`FromStr`] and deserialization all
//! refuse a layer at or above [`MAX_LAYERS`] or an index at or above [`MAX_EXPERTS_PER_LAYER`], and
//! [`super::ModelConfig::validate`] refuses models larger than that, so every shard a model has is nameable.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Number of transformer layers a shard id may name (`expert/<layer>/<index>` has `layer` below this).
pub const MAX_LAYERS: u16 = 1024;

/// Number of experts per layer a shard id may name (`index` below this).
pub const MAX_EXPERTS_PER_LAYER: u16 = 4096;

/// The unit in which parameters are hosted, exported, checkpointed and sent: the trunk, or one routed expert.
///
/// Text form: `trunk` or `expert/<layer>/<index>` (decimal, no leading zeros). Wire form (serde, so bincode on
/// the wire): an enum, variant 0 = trunk, 1 = expert with two `u16`s. Order: the trunk first, then experts by
/// (layer, index), the order of the parameter layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "ShardIdWire")]
pub enum ShardId {
    /// Everything that is not a routed expert: embedding, attention, norms, dense and shared FFNs, routers,
    /// MTP module, head.
    Trunk,
    /// Routed expert `index` of block `layer` (a MoE block).
    Expert {
        /// Block index, below [`MAX_LAYERS`].
        layer: u16,
        /// Expert index within the block, below [`MAX_EXPERTS_PER_LAYER`].
        index: u16,
    },
}

/// The unchecked wire twin of [`ShardId`], so that decoding goes through the bounds check.
#[derive(Deserialize)]
enum ShardIdWire {
    Trunk,
    Expert { layer: u16, index: u16 },
}

impl TryFrom<ShardIdWire> for ShardId {
    type Error = ShardIdError;
    fn try_from(wire: ShardIdWire) -> Result<Self, Self::Error> {
        match wire {
            ShardIdWire::Trunk => Ok(ShardId::Trunk),
            ShardIdWire::Expert { layer, index } => ShardId::expert(layer, index),
        }
    }
}

/// Why a shard id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardIdError {
    /// The layer or the index is beyond the bounds.
    #[error("{0} is out of bounds (layer < {MAX_LAYERS}, index < {MAX_EXPERTS_PER_LAYER})")]
    OutOfBounds(String),
    /// The text is neither `trunk` nor a canonical `expert/<layer>/<index>` (at most 80 bytes of it are kept).
    #[error("{0:?} is neither `trunk` nor `expert/<layer>/<index>`")]
    Syntax(String),
}

impl ShardId {
    /// The id of routed expert `index` in `layer`, checked against the bounds. Takes any integer the caller
    /// indexes with (`usize` in the model, `u16` from the wire).
    pub fn expert<L, I>(layer: L, index: I) -> Result<ShardId, ShardIdError>
    where
        L: TryInto<u16> + Copy + fmt::Display,
        I: TryInto<u16> + Copy + fmt::Display,
    {
        let out = || ShardIdError::OutOfBounds(format!("expert/{layer}/{index}"));
        let l: u16 = layer.try_into().map_err(|_| out())?;
        let i: u16 = index.try_into().map_err(|_| out())?;
        if l >= MAX_LAYERS || i >= MAX_EXPERTS_PER_LAYER {
            return Err(out());
        }
        Ok(ShardId::Expert { layer: l, index: i })
    }

    /// The layer and index of an expert as the model indexes them; `None` for the trunk.
    pub fn expert_position(&self) -> Option<(usize, usize)> {
        match *self {
            ShardId::Trunk => None,
            ShardId::Expert { layer, index } => Some((usize::from(layer), usize::from(index))),
        }
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShardId::Trunk => f.write_str("trunk"),
            ShardId::Expert { layer, index } => write!(f, "expert/{layer}/{index}"),
        }
    }
}

impl FromStr for ShardId {
    type Err = ShardIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "trunk" {
            return Ok(ShardId::Trunk);
        }
        let bad = || ShardIdError::Syntax(truncate(s).to_owned());
        let rest = s.strip_prefix("expert/").ok_or_else(bad)?;
        let (layer, index) = rest.split_once('/').ok_or_else(bad)?;
        ShardId::expert(
            parse_decimal_u16(layer).ok_or_else(bad)?,
            parse_decimal_u16(index).ok_or_else(bad)?,
        )
    }
}

/// Parses a canonical decimal: digits only, no sign, no leading zero (except "0"), so each id has one text form.
fn parse_decimal_u16(s: &str) -> Option<u16> {
    if s.is_empty()
        || s.len() > 5
        || !s.bytes().all(|b| b.is_ascii_digit())
        || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

/// At most 80 bytes of untrusted text, for error messages.
fn truncate(s: &str) -> &str {
    let mut end = s.len().min(80);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    // The text forms (canonical, bounded) are tested where they were first specified, in the protocol's ids.rs.

    #[test]
    fn the_checked_constructor_takes_model_and_wire_integers() {
        assert_eq!(
            ShardId::expert(3usize, 5usize).unwrap(),
            ShardId::Expert { layer: 3, index: 5 }
        );
        assert_eq!(
            ShardId::expert(3u16, 5u16).unwrap().expert_position(),
            Some((3, 5))
        );
        assert!(ShardId::expert(1usize << 20, 0usize).is_err());
        assert!(ShardId::expert(0u16, MAX_EXPERTS_PER_LAYER).is_err());
        assert_eq!(ShardId::Trunk.expert_position(), None);
    }
}
