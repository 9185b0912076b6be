//! Flat parameters: each unit's buffer padded to a multiple of the shard-group size and cut into
//! equal contiguous shards, one per group rank. The layout is a pure function of the model layout
//! and the group size, so any rank (or a later resharding reader) computes the same byte ranges.

use std::ops::Range;

use crate::model::ParamLayout;

/// One unit's flat buffer as the shard group sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitShard {
    /// Real elements of the unit.
    pub numel: usize,
    /// `numel` rounded up to a multiple of the group size (the tail is zero padding).
    pub padded: usize,
    /// Elements each group rank owns: `padded / group_size`.
    pub shard_len: usize,
}

/// A contiguous piece of one tensor inside a rank's shard, for per-tensor optimizer settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Offset inside the rank's shard.
    pub offset: usize,
    pub len: usize,
    /// AdamW weight decay applies to this tensor.
    pub decay: bool,
}

/// Every unit's padding and shard size for one group size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    pub group_size: usize,
    pub units: Vec<UnitShard>,
}

impl ShardLayout {
    pub fn new(layout: &ParamLayout, group_size: usize) -> Self {
        let units = layout
            .units
            .iter()
            .map(|u| {
                let padded = u.numel.div_ceil(group_size) * group_size;
                UnitShard {
                    numel: u.numel,
                    padded,
                    shard_len: padded / group_size,
                }
            })
            .collect();
        ShardLayout { group_size, units }
    }

    /// The range of `unit`'s padded flat buffer that `group_rank` owns.
    pub fn range(&self, unit: usize, group_rank: usize) -> Range<usize> {
        let len = self.units[unit].shard_len;
        group_rank * len..(group_rank + 1) * len
    }

    /// `group_rank`'s shard of `unit`, cut from the unit's full (unpadded) values; the padding
    /// tail is zero.
    pub fn shard_of(&self, unit: usize, group_rank: usize, full: &[f32]) -> Vec<f32> {
        let range = self.range(unit, group_rank);
        let mut mine = vec![0.0f32; range.len()];
        let end = range.end.min(full.len());
        if range.start < end {
            mine[..end - range.start].copy_from_slice(&full[range.start..end]);
        }
        mine
    }

    /// The pieces of real tensors inside `group_rank`'s shard of `unit` (padding excluded).
    pub fn segments(&self, layout: &ParamLayout, unit: usize, group_rank: usize) -> Vec<Segment> {
        let shard = self.range(unit, group_rank);
        layout.units[unit]
            .tensors
            .iter()
            .filter_map(|t| {
                let start = t.offset.max(shard.start);
                let end = (t.offset + t.numel()).min(shard.end);
                (start < end).then(|| Segment {
                    offset: start - shard.start,
                    len: end - start,
                    decay: t.decay,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GptShape;

    fn layout() -> ParamLayout {
        ParamLayout::gpt(
            GptShape {
                n_layer: 2,
                n_head: 2,
                d_model: 6,
                vocab_size: 13,
                block_size: 5,
            },
            0.02,
        )
    }

    #[test]
    fn shards_tile_the_padded_unit_and_segments_cover_every_real_element() {
        let l = layout();
        for group in 1..=5 {
            let s = ShardLayout::new(&l, group);
            for (u, unit) in s.units.iter().enumerate() {
                assert_eq!(unit.padded % group, 0);
                assert!(unit.padded >= unit.numel && unit.padded - unit.numel < group);
                let mut covered = 0;
                let mut decayed = 0;
                for r in 0..group {
                    let range = s.range(u, r);
                    assert_eq!(range.len(), unit.shard_len);
                    for seg in s.segments(&l, u, r) {
                        assert!(seg.offset + seg.len <= unit.shard_len);
                        covered += seg.len;
                        decayed += if seg.decay { seg.len } else { 0 };
                    }
                }
                assert_eq!(covered, unit.numel, "group {group} unit {u}");
                let want: usize = l.units[u]
                    .tensors
                    .iter()
                    .filter(|t| t.decay)
                    .map(|t| t.numel())
                    .sum();
                assert_eq!(decayed, want);
                // The shards of real values, concatenated, give the unit back.
                let full: Vec<f32> = (0..unit.numel).map(|i| i as f32 + 1.0).collect();
                let joined: Vec<f32> = (0..group).flat_map(|r| s.shard_of(u, r, &full)).collect();
                assert_eq!(&joined[..unit.numel], &full[..]);
                assert!(joined[unit.numel..].iter().all(|&x| x == 0.0));
            }
        }
    }
}
