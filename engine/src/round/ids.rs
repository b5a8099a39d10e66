//! Conversions between the two shard ids: the kernels' [`mana_kernels::model::ShardId`] (usize layer and
//! index, what the model indexes with) and the protocol's [`mana_protocol::ShardId`] (u16, bounds-checked,
//! what travels on the wire). Both print the same text form (`trunk`, `expert/<layer>/<index>`).

use mana_kernels::model::ShardId as KShard;
use mana_protocol::ShardId as WShard;

use super::error::RoundError;

/// The wire id of a kernels shard; an expert beyond the protocol's bounds is [`RoundError::UnknownShard`].
pub fn to_wire(shard: KShard) -> Result<WShard, RoundError> {
    match shard {
        KShard::Trunk => Ok(WShard::Trunk),
        KShard::Expert { layer, index } => {
            let unknown = || RoundError::UnknownShard { shard: shard.to_string() };
            let layer = u16::try_from(layer).map_err(|_| unknown())?;
            let index = u16::try_from(index).map_err(|_| unknown())?;
            WShard::expert(layer, index).map_err(|_| unknown())
        }
    }
}

/// The kernels id of a wire shard (always representable).
pub fn from_wire(shard: WShard) -> KShard {
    match shard {
        WShard::Trunk => KShard::Trunk,
        WShard::Expert { layer, index } => KShard::Expert { layer: usize::from(layer), index: usize::from(index) },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_same_text() {
        for k in [KShard::Trunk, KShard::Expert { layer: 1, index: 7 }, KShard::Expert { layer: 0, index: 0 }] {
            let w = to_wire(k).unwrap();
            assert_eq!(from_wire(w), k);
            assert_eq!(w.to_string(), k.to_string());
        }
        assert!(to_wire(KShard::Expert { layer: 1 << 20, index: 0 }).is_err());
    }
}
