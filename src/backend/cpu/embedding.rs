//! CPU token + position embedding, forward and backward.

use super::real::Real;

pub fn embedding_forward<T: Real>(
    out: &mut [T],
    ids: &[u32],
    wte: &[T],
    wpe: &[T],
    seq: usize,
    channels: usize,
) {
    for (i, (o, &id)) in out.chunks_exact_mut(channels).zip(ids).enumerate() {
        let t = i % seq;
        let tok = &wte[id as usize * channels..][..channels];
        let pos = &wpe[t * channels..][..channels];
        for c in 0..channels {
            o[c] = tok[c] + pos[c];
        }
    }
}

pub fn embedding_backward<T: Real>(
    dwte: &mut [T],
    dwpe: &mut [T],
    dout: &[T],
    ids: &[u32],
    seq: usize,
    channels: usize,
) {
    for (i, (d, &id)) in dout.chunks_exact(channels).zip(ids).enumerate() {
        let t = i % seq;
        let tok = &mut dwte[id as usize * channels..][..channels];
        for c in 0..channels {
            tok[c] += d[c];
        }
        let pos = &mut dwpe[t * channels..][..channels];
        for c in 0..channels {
            pos[c] += d[c];
        }
    }
}
