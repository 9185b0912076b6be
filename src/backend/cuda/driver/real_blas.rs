//! cuBLASLt under the real driver: a handle per stream, and per descriptor (the values the shared
//! code chose, see [`GemmDesc`]) the matmul descriptor, its three layouts and the algorithm the
//! heuristic picks, created once and cached. A descriptor with a fused epilogue for which the
//! heuristic has no algorithm is remembered as refused and reported as [`NoAlgorithm`] (logged
//! once), so the backend falls back to unfused ops instead of failing the run.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::sync::Mutex;

use anyhow::{anyhow, Result};
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;

use super::{Epilogue, GemmCall, GemmDesc, MatrixLayout, NoAlgorithm};
use crate::backend::DType;

/// Everything cuBLASLt needs for one descriptor; destroyed with the cache.
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
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
        }
    }
}

struct LtState {
    handle: sys::cublasLtHandle_t,
    plans: HashMap<GemmDesc, Plan>,
    /// Fused descriptors the heuristic found no algorithm for.
    refused: HashSet<GemmDesc>,
}

impl Drop for LtState {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: the handle was created once in `LtCache::matmul` and is destroyed once.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

/// One stream's cuBLASLt handle (made at the first matmul) and plan cache.
#[derive(Default)]
pub(super) struct LtCache {
    state: Mutex<Option<LtState>>,
}

// SAFETY: the raw cuBLASLt handles are only used under the mutex.
unsafe impl Send for LtCache {}
// SAFETY: as above.
unsafe impl Sync for LtCache {}

fn data_type(d: DType) -> sys::cudaDataType {
    match d {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::Bf16 => sys::cudaDataType::CUDA_R_16BF,
    }
}

fn lt_err(what: &str) -> impl FnOnce(lt::CublasError) -> anyhow::Error + '_ {
    move |e| anyhow!("cuBLASLt {what}: {e:?}")
}

impl LtCache {
    /// Issues `call` on `stream` (the context is bound by the caller).
    ///
    /// # Safety
    /// The addresses in `call` must be live device memory covering their layouts.
    pub(super) unsafe fn matmul(
        &self,
        stream: cudarc::driver::sys::CUstream,
        call: &GemmCall,
    ) -> Result<()> {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            let handle = lt::create_handle().map_err(lt_err("create handle"))?;
            *guard = Some(LtState {
                handle,
                plans: HashMap::new(),
                refused: HashSet::new(),
            });
        }
        let state = guard.as_mut().expect("made above");
        let handle = state.handle;
        if state.refused.contains(&call.desc) {
            return Err(NoAlgorithm(format!("{:?}", call.desc.epilogue)).into());
        }
        let plan = match state.plans.entry(call.desc) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => match make_plan(handle, &call.desc, call.workspace_bytes) {
                Ok(plan) => e.insert(plan),
                Err(PlanError::NoAlgorithm(why)) if is_fused(&call.desc) => {
                    tracing::warn!(
                        "cuBLASLt has no algorithm for {:?} ({why}): these products run unfused",
                        call.desc
                    );
                    state.refused.insert(call.desc);
                    return Err(NoAlgorithm(why).into());
                }
                Err(PlanError::NoAlgorithm(why)) => {
                    return Err(anyhow!(
                        "cuBLASLt has no algorithm for {:?}: {why}",
                        call.desc
                    ))
                }
                Err(PlanError::Other(e)) => return Err(e),
            },
        };
        let alpha: f32 = 1.0;
        let beta: f32 = if call.desc.accumulate { 1.0 } else { 0.0 };
        use sys::cublasLtMatmulDescAttributes_t as D;
        // The pointers are descriptor attributes, set under the same lock as the call.
        if call.desc.bias.is_some() {
            let p = call.bias as *const c_void;
            set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p)?;
        }
        if call.desc.epilogue.has_aux() {
            let p = call.aux as *const c_void;
            set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &p)?;
        }
        lt::matmul(
            handle,
            plan.desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            call.a as *const c_void,
            plan.layouts[0],
            call.b as *const c_void,
            plan.layouts[1],
            call.c as *const c_void,
            plan.layouts[2],
            call.d as *mut c_void,
            plan.layouts[2],
            &plan.algo,
            call.workspace as *mut c_void,
            call.workspace_bytes,
            stream as sys::cudaStream_t,
        )
        .map_err(|e| anyhow!("cuBLASLt matmul {:?}: {e:?}", call.desc))
    }
}

fn layout(l: &MatrixLayout) -> Result<sys::cublasLtMatrixLayout_t> {
    lt::create_matrix_layout(data_type(l.dtype), l.rows, l.cols, l.ld as i64)
        .map_err(lt_err("create layout"))
}

/// Whether `d` is one of the fused products (an epilogue beyond the bias, or C distinct from D),
/// which may fall back to unfused ops.
fn is_fused(d: &GemmDesc) -> bool {
    d.out_of_place || !matches!(d.epilogue, Epilogue::Default | Epilogue::Bias)
}

fn lt_epilogue(e: Epilogue) -> sys::cublasLtEpilogue_t {
    use sys::cublasLtEpilogue_t as E;
    match e {
        Epilogue::Default => E::CUBLASLT_EPILOGUE_DEFAULT,
        Epilogue::Bias => E::CUBLASLT_EPILOGUE_BIAS,
        Epilogue::GeluAux => E::CUBLASLT_EPILOGUE_GELU_AUX,
        Epilogue::GeluAuxBias => E::CUBLASLT_EPILOGUE_GELU_AUX_BIAS,
        Epilogue::DGelu => E::CUBLASLT_EPILOGUE_DGELU,
        Epilogue::DGeluBGrad => E::CUBLASLT_EPILOGUE_DGELU_BGRAD,
        Epilogue::BGradB => E::CUBLASLT_EPILOGUE_BGRADB,
    }
}

/// Why no plan was made: the heuristic found no algorithm, or another failure.
enum PlanError {
    NoAlgorithm(String),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for PlanError {
    fn from(e: anyhow::Error) -> Self {
        PlanError::Other(e)
    }
}

/// Creates the descriptor and layouts for `key` and asks the heuristic for its best algorithm.
fn make_plan(
    handle: sys::cublasLtHandle_t,
    key: &GemmDesc,
    workspace: usize,
) -> std::result::Result<Plan, PlanError> {
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
    plan.layouts[0] = layout(&key.a)?;
    plan.layouts[1] = layout(&key.b)?;
    plan.layouts[2] = layout(&key.d)?;
    // The attribute is cuBLAS's cublasOperation_t, an int32.
    let op = |t: bool| {
        use cudarc::cublas::sys::cublasOperation_t as Op;
        (if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N }) as i32
    };
    use sys::cublasLtMatmulDescAttributes_t as D;
    // SAFETY: attribute buffers are live locals of the sizes given.
    unsafe {
        set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_TRANSA, &op(key.trans_a))?;
        set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_TRANSB, &op(key.trans_b))?;
        if key.epilogue != Epilogue::Default {
            let epilogue = lt_epilogue(key.epilogue);
            set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
        }
        if let Some(bias) = key.bias {
            // The bias, or the bias gradient the BGRAD epilogues write: D's type (the shared code
            // checked), the documented default, set explicitly.
            set_desc(
                plan.desc,
                D::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                &data_type(bias),
            )?;
        }
        if key.epilogue.has_aux() {
            // An int64; the auxiliary matrix takes D's type by default (not set here: the
            // attribute's type rules concern FP8 outputs).
            let ld = key.aux_ld as i64;
            set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ld)?;
        }
    }
    let pref = lt::create_matmul_pref().map_err(lt_err("create preference"))?;
    let chosen = (|| -> std::result::Result<sys::cublasLtMatmulHeuristicResult_t, PlanError> {
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        let ws = workspace as u64;
        // SAFETY: attribute buffers are live locals of the sizes given; the descriptors are valid.
        unsafe {
            set_pref(pref, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws)?;
            set_pref(
                pref,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                &key.align[0],
            )?;
            set_pref(
                pref,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                &key.align[1],
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
            .map_err(|e| PlanError::NoAlgorithm(format!("{e:?}")))
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
