//! CPU buffers: shared, interior-mutable storage behind cheap handles, like device memory.
//!
//! A [`CpuBuf`] is an `Arc` to one allocation plus a range and a dtype. Ops borrow the ranges they
//! read and write through [`Borrows`], which refuses an output that overlaps another operand, so the
//! unsafe interior mutability below never hands out aliasing `&mut` slices.

use std::cell::UnsafeCell;
use std::fmt;
use std::sync::Arc;

use anyhow::{bail, Result};
use half::bf16;

use super::real::Real;
use crate::backend::{Buffer, DType};

struct Storage<T> {
    data: UnsafeCell<Vec<T>>,
}

// SAFETY: access goes through `Borrows`, which checks that no two live borrows of one op overlap
// when one of them is mutable; ops on one backend run in issue order (the Backend contract), so
// no other thread writes a range an op is using.
unsafe impl<T: Send> Sync for Storage<T> {}

/// A view of CPU memory: `len` elements from `offset` of a shared allocation.
#[derive(Clone)]
pub struct CpuBuf<T> {
    storage: Arc<Storage<T>>,
    offset: usize,
    len: usize,
    dtype: DType,
}

impl<T: Real> CpuBuf<T> {
    pub(crate) fn zeros(len: usize, dtype: DType) -> Self {
        CpuBuf {
            storage: Arc::new(Storage {
                data: UnsafeCell::new(vec![T::zero(); len]),
            }),
            offset: 0,
            len,
            dtype,
        }
    }

    pub(crate) fn view(&self, offset: usize, len: usize) -> Result<Self> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.len) {
            bail!(
                "slice {offset}..{offset}+{len} is out of range of a buffer of {} elements",
                self.len
            );
        }
        Ok(CpuBuf {
            storage: self.storage.clone(),
            offset: self.offset + offset,
            len,
            dtype: self.dtype,
        })
    }

    fn range(&self) -> (usize, usize) {
        (self.offset, self.offset + self.len)
    }

    fn overlaps(&self, other: &Self) -> bool {
        let (a0, a1) = self.range();
        let (b0, b1) = other.range();
        Arc::ptr_eq(&self.storage, &other.storage) && a0 < b1 && b0 < a1 && self.len > 0
    }

    /// Overwrites this view with `values` at full `T` precision (rounded to the dtype).
    pub fn set(&self, values: &[T]) -> Result<()> {
        if values.len() != self.len {
            bail!("set: {} values for a buffer of {}", values.len(), self.len);
        }
        // SAFETY: an exclusive write of this range between ops (issue order); no op is running.
        let dst = unsafe { self.slice_mut() };
        dst.copy_from_slice(values);
        round_to_dtype(self.dtype, dst);
        Ok(())
    }

    /// Copies the values out at full `T` precision (test and host-transfer helper).
    pub fn to_vec(&self) -> Vec<T> {
        // SAFETY: a shared read of this range while no op is running on it (issue order).
        unsafe { self.slice_ref().to_vec() }
    }

    unsafe fn slice_ref(&self) -> &[T] {
        let all = &*self.storage.data.get();
        &all[self.offset..self.offset + self.len]
    }

    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self) -> &mut [T] {
        let all = &mut *self.storage.data.get();
        &mut all[self.offset..self.offset + self.len]
    }
}

impl<T> fmt::Debug for CpuBuf<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CpuBuf({} x {} at {})",
            self.len, self.dtype, self.offset
        )
    }
}

impl<T: Real> Buffer for CpuBuf<T> {
    fn len(&self) -> usize {
        self.len
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
}

/// The operands of one op: every output must be disjoint from every other operand.
pub(crate) struct Borrows<'a, T> {
    op: &'static str,
    outs: Vec<(&'static str, &'a CpuBuf<T>)>,
}

impl<'a, T: Real> Borrows<'a, T> {
    /// Checks that no output overlaps another output or any input.
    pub(crate) fn check(
        op: &'static str,
        outs: &[(&'static str, &'a CpuBuf<T>)],
        ins: &[(&'static str, &'a CpuBuf<T>)],
    ) -> Result<Self> {
        for (i, (name, out)) in outs.iter().enumerate() {
            for (other_name, other) in outs[i + 1..].iter().chain(ins.iter()) {
                if out.overlaps(other) {
                    bail!("{op}: output `{name}` overlaps `{other_name}` (aliasing is not allowed here)");
                }
            }
        }
        Ok(Borrows {
            op,
            outs: outs.to_vec(),
        })
    }

    /// Shared view of an input.
    pub(crate) fn input(&self, buf: &'a CpuBuf<T>) -> &'a [T] {
        debug_assert!(
            !self.outs.iter().any(|(_, o)| o.overlaps(buf)),
            "{}: input read while written",
            self.op
        );
        // SAFETY: `check` proved no output of this op overlaps an input; nothing else runs meanwhile.
        unsafe { buf.slice_ref() }
    }

    /// Exclusive view of the `i`-th output given to `check`.
    #[allow(clippy::mut_from_ref)]
    pub(crate) fn output(&self, i: usize) -> &'a mut [T] {
        // SAFETY: `check` proved outputs are pairwise disjoint and disjoint from inputs, and each
        // output index is taken once per op by the caller.
        unsafe { self.outs[i].1.slice_mut() }
    }
}

/// Rounds every stored value to the buffer's dtype (bf16 emulation; f32 buffers are left alone,
/// so the f64 backend keeps full precision for gradient checks).
pub(crate) fn round_to_dtype<T: Real>(dtype: DType, values: &mut [T]) {
    if dtype == DType::Bf16 {
        for x in values.iter_mut() {
            *x = T::of_f32(bf16::from_f32(x.as_f32()).to_f32());
        }
    }
}
