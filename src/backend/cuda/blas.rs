//! Matrix products through cuBLASLt: bf16 or f32 inputs, f32 accumulation (never TF32: the f32
//! path must match the CPU reference to 1e-5), the bias added by the GEMM's epilogue.
//!
//! Row-major `out[m, n] = op(a) · op(b)` is computed as the column-major product
//! `outᵀ[n, m] = op(b)ᵀ · op(a)ᵀ`: a row-major matrix is its own transpose in column-major, so no
//! data moves, and the bias (one value per output column) becomes cuBLASLt's per-row bias.
//! Descriptors and the heuristic's algorithm are cached per shape, dtypes and pointer alignment.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Result};
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::CudaStream;

use super::memory::{CudaBuf, DeviceMemory, MemoryStats};
use crate::backend::{DType, MatmulSpec};

/// cuBLASLt workspace: NVIDIA recommends 32 MiB on Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PlanKey {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    inputs: DType,
    out: DType,
    bias: Option<DType>,
    /// Alignment in bytes of a, b, out (and bias): the algorithm chosen must fit the pointers.
    align: [u32; 4],
}

/// Everything cuBLASLt needs for one product shape; destroyed with the cache.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created once by this plan and is destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
        }
    }
}

struct LtState {
    handle: sys::cublasLtHandle_t,
    plans: HashMap<PlanKey, Plan>,
}

impl Drop for LtState {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: the handle was created once in `Blas::new` and is destroyed once.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

/// One rank's cuBLASLt handle, workspace and plan cache, bound to its stream.
pub(super) struct Blas {
    state: Mutex<LtState>,
    workspace: DeviceMemory,
    stream: Arc<CudaStream>,
}

// SAFETY: the raw cuBLASLt handles are only used under the mutex.
unsafe impl Send for Blas {}
// SAFETY: as above.
unsafe impl Sync for Blas {}

fn data_type(d: DType) -> sys::cudaDataType {
    match d {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::Bf16 => sys::cudaDataType::CUDA_R_16BF,
    }
}

/// Largest power of two (up to 256) dividing the address.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        (1u64 << ptr.trailing_zeros().min(8)) as u32
    }
}

fn lt_err(what: &str) -> impl FnOnce(cudarc::cublaslt::result::CublasError) -> anyhow::Error + '_ {
    move |e| anyhow!("cuBLASLt {what}: {e:?}")
}

impl Blas {
    pub(super) fn new(stream: &Arc<CudaStream>, stats: &Arc<MemoryStats>) -> Result<Blas> {
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context: {e:?}"))?;
        let handle = lt::create_handle().map_err(lt_err("create handle"))?;
        Ok(Blas {
            state: Mutex::new(LtState {
                handle,
                plans: HashMap::new(),
            }),
            workspace: DeviceMemory::new(stream, stats, WORKSPACE_BYTES)?,
            stream: stream.clone(),
        })
    }

    /// `out (+)= op(a) · op(b) (+ bias)`; the caller checked lengths and overlap.
    pub(super) fn matmul(
        &self,
        out: &CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        bias: Option<&CudaBuf>,
        s: MatmulSpec,
    ) -> Result<()> {
        if a.dtype != b.dtype {
            bail!(
                "matmul: `a` is {} and `b` is {}; the CUDA backend multiplies operands of one dtype",
                a.dtype,
                b.dtype
            );
        }
        if a.dtype == DType::F32 && out.dtype != DType::F32 {
            bail!(
                "matmul: f32 operands need an f32 `out` on CUDA, it is {}",
                out.dtype
            );
        }
        if let Some(bias) = bias {
            if bias.dtype != out.dtype {
                bail!(
                    "matmul: `bias` is {} and `out` is {}; cuBLASLt's bias epilogue needs them equal",
                    bias.dtype,
                    out.dtype
                );
            }
        }
        let key = PlanKey {
            m: s.m,
            n: s.n,
            k: s.k,
            trans_a: s.trans_a,
            trans_b: s.trans_b,
            inputs: a.dtype,
            out: out.dtype,
            bias: bias.map(|x| x.dtype),
            align: [
                alignment(a.ptr()),
                alignment(b.ptr()),
                alignment(out.ptr()),
                bias.map_or(256, |x| alignment(x.ptr())),
            ],
        };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let handle = state.handle;
        let plan = match state.plans.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(make_plan(handle, &key, WORKSPACE_BYTES)?),
        };
        let alpha: f32 = 1.0;
        let beta: f32 = if s.accumulate { 1.0 } else { 0.0 };
        // SAFETY: every pointer is a live device allocation of the lengths the caller checked,
        // the descriptors describe exactly those shapes, and the workspace outlives the call
        // (stream-ordered free). The bias pointer attribute is set under the same lock.
        unsafe {
            if let Some(bias) = bias {
                let p = bias.ptr() as *const c_void;
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &p as *const *const c_void as *const c_void,
                    std::mem::size_of::<*const c_void>(),
                )
                .map_err(lt_err("set bias pointer"))?;
            }
            lt::matmul(
                handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                // Column-major: the first operand is b, the second a (see the module docs).
                b.ptr() as *const c_void,
                plan.layouts[0],
                a.ptr() as *const c_void,
                plan.layouts[1],
                out.ptr() as *const c_void,
                plan.layouts[2],
                out.ptr() as *mut c_void,
                plan.layouts[2],
                &plan.algo,
                self.workspace.ptr() as *mut c_void,
                WORKSPACE_BYTES,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
            .map_err(|e| {
                anyhow!(
                    "cuBLASLt matmul m={} n={} k={} (trans_a {}, trans_b {}, {} -> {}): {e:?}",
                    s.m,
                    s.n,
                    s.k,
                    s.trans_a,
                    s.trans_b,
                    a.dtype,
                    out.dtype
                )
            })?;
        }
        Ok(())
    }
}

/// Creates the descriptor and layouts for `key` and asks the heuristic for its best algorithm.
fn make_plan(handle: sys::cublasLtHandle_t, key: &PlanKey, workspace: usize) -> Result<Plan> {
    let (m, n, k) = (key.m as u64, key.n as u64, key.k as u64);
    let inputs = data_type(key.inputs);
    let out = data_type(key.out);
    let desc = lt::create_matmul_desc(
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        sys::cudaDataType::CUDA_R_32F,
    )
    .map_err(lt_err("create matmul descriptor"))?;
    // From here on `plan` owns what is created, so an error destroys it.
    let mut plan = Plan {
        desc,
        layouts: [std::ptr::null_mut(); 3],
        // SAFETY: a plain-old-data struct the heuristic fills in below.
        algo: unsafe { std::mem::zeroed() },
    };
    // First operand: b as stored, [k, n] row-major = (n x k, ld n) column-major, or [n, k]
    // row-major = (k x n, ld k) transposed to n x k.
    let (b_rows, b_cols, b_ld) = if key.trans_b { (k, n, k) } else { (n, k, n) };
    let (a_rows, a_cols, a_ld) = if key.trans_a { (m, k, m) } else { (k, m, k) };
    plan.layouts[0] = lt::create_matrix_layout(inputs, b_rows, b_cols, b_ld as i64)
        .map_err(lt_err("create layout"))?;
    plan.layouts[1] = lt::create_matrix_layout(inputs, a_rows, a_cols, a_ld as i64)
        .map_err(lt_err("create layout"))?;
    plan.layouts[2] =
        lt::create_matrix_layout(out, n, m, n as i64).map_err(lt_err("create layout"))?;
    // The attribute is cuBLAS's cublasOperation_t, an int32.
    let op = |t: bool| {
        use cudarc::cublas::sys::cublasOperation_t as Op;
        (if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N }) as i32
    };
    let trans_first = op(key.trans_b);
    let trans_second = op(key.trans_a);
    // SAFETY: attribute buffers are live locals of the sizes given.
    unsafe {
        set_desc(
            plan.desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &trans_first,
        )?;
        set_desc(
            plan.desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            &trans_second,
        )?;
        if let Some(bias) = key.bias {
            let epilogue = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
            set_desc(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epilogue,
            )?;
            let bias_type = data_type(bias);
            set_desc(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                &bias_type,
            )?;
        }
    }
    let pref = lt::create_matmul_pref().map_err(lt_err("create preference"))?;
    let chosen = (|| -> Result<sys::cublasLtMatmulHeuristicResult_t> {
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        let ws = workspace as u64;
        // SAFETY: attribute buffers are live locals of the sizes given; the descriptors are valid.
        unsafe {
            set_pref(pref, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws)?;
            set_pref(
                pref,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                &key.align[1],
            )?;
            set_pref(
                pref,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                &key.align[0],
            )?;
            set_pref(
                pref,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                &key.align[2],
            )?;
            set_pref(
                pref,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                &key.align[2],
            )?;
            lt::get_matmul_algo_heuristic(
                handle,
                plan.desc,
                plan.layouts[0],
                plan.layouts[1],
                plan.layouts[2],
                plan.layouts[2],
                pref,
            )
            .map_err(|e| {
                anyhow!(
                    "cuBLASLt has no algorithm for m={} n={} k={} (trans_a {}, trans_b {}, {} -> {}, \
                     bias {:?}, alignments {:?}): {e:?}",
                    key.m,
                    key.n,
                    key.k,
                    key.trans_a,
                    key.trans_b,
                    key.inputs,
                    key.out,
                    key.bias,
                    key.align
                )
            })
        }
    })();
    // SAFETY: created above, destroyed once.
    unsafe {
        let _ = lt::destroy_matmul_pref(pref);
    }
    plan.algo = chosen?.algo;
    Ok(plan)
}

/// Sets one matmul-descriptor attribute from a value.
unsafe fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<()> {
    lt::set_matmul_desc_attribute(
        desc,
        attr,
        value as *const T as *const c_void,
        std::mem::size_of::<T>(),
    )
    .map_err(|e| anyhow!("cuBLASLt descriptor attribute {attr:?}: {e:?}"))
}

/// Sets one preference attribute from a value.
unsafe fn set_pref<T>(
    pref: sys::cublasLtMatmulPreference_t,
    attr: sys::cublasLtMatmulPreferenceAttributes_t,
    value: &T,
) -> Result<()> {
    lt::set_matmul_pref_attribute(
        pref,
        attr,
        value as *const T as *const c_void,
        std::mem::size_of::<T>(),
    )
    .map_err(|e| anyhow!("cuBLASLt preference attribute {attr:?}: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::alignment;

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0x1010), 16);
        assert_eq!(alignment(0x1080), 128);
    }
}
