//! The CUDA backend: the [`Backend`] ops on one GPU, each a kernel from `kernels/` (compiled at
//! build time) or a cuBLASLt product, issued in order on the rank's own stream.
//!
//! Every op checks lengths, dtypes and overlap exactly as the CPU reference does, then launches;
//! a launch failure is an error naming the kernel. Ops are asynchronous: [`Backend::download`] and
//! [`Backend::synchronize`] wait, and report any fault of the kernels queued before them. There is
//! no global state: a [`CudaDevice`] (context and kernels) is shared by the ranks on one GPU, and
//! each rank's backend owns its stream, its cuBLASLt handle and workspace, and its memory counts.

mod blas;
mod device;
mod launch;
mod memory;
mod profile;

use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, bail, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};
use half::bf16;

pub use device::{device_count, unavailable_reason, CudaDevice};
pub use memory::{CudaBuf, CudaIds, MemoryStats};

use super::{
    expect_dtype, expect_len, shapes, AdamWStep, AttentionShape, Backend, Buffer, DType,
    MatmulSpec, OpTime, TimingMark,
};
use blas::Blas;
use launch::{grid_for, int, launch, row_block, Arg, BLOCK};
use memory::DeviceMemory;
use profile::OpProfiler;

/// Rows of the bias gradient summed by one block before the fixed-order final pass.
const ROWS_PER_CHUNK: usize = 256;
/// Query (or key) rows per attention block: `TILE` in kernels/attention.cu.
const ATTENTION_TILE: u32 = 64;

/// One rank's view of a GPU: its stream, cuBLASLt state and memory counts, and a second backend
/// on a stream of its own for communication (the comm lane).
pub struct CudaBackend {
    device: Arc<CudaDevice>,
    stream: Arc<CudaStream>,
    /// Created at the first matmul (the comm lane never needs one).
    blas: OnceLock<Blas>,
    stats: Arc<MemoryStats>,
    profiler: OpProfiler,
    lane: Option<Box<CudaBackend>>,
}

/// A recorded point of a CUDA stream.
#[derive(Clone)]
pub struct CudaMark(Arc<CudaEvent>);

impl CudaMark {
    /// Whether the work before the mark has finished (false also on a device error).
    pub fn is_complete(&self) -> bool {
        self.0.is_complete()
    }
}

impl std::fmt::Debug for CudaMark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CudaMark")
    }
}

/// The kernel-name suffix of a dtype.
fn tn(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::Bf16 => "bf16",
    }
}

fn ptr(b: &CudaBuf) -> Arg {
    Arg::Ptr(b.ptr())
}

fn long(n: usize) -> Arg {
    Arg::Long(n as i64)
}

/// Fails unless every named buffer has `dtype` (the kernels are instantiated per dtype family).
fn same_dtype(op: &str, dtype: DType, bufs: &[(&str, &CudaBuf)]) -> Result<()> {
    for (what, b) in bufs {
        if b.dtype != dtype {
            bail!(
                "{op}: `{what}` is {} but the CUDA kernel for this op takes {dtype} here (as its \
                 first operand); mixed dtypes are supported only where the model needs them",
                b.dtype
            );
        }
    }
    Ok(())
}

/// Fails if an output overlaps an input or another output (the CPU backend refuses these too).
fn no_overlap(op: &str, outputs: &[(&str, &CudaBuf)], inputs: &[(&str, &CudaBuf)]) -> Result<()> {
    for (i, (oname, o)) in outputs.iter().enumerate() {
        if o.is_empty() {
            continue;
        }
        let others = outputs[i + 1..].iter().chain(inputs.iter());
        for (name, b) in others {
            if !b.is_empty() && o.overlaps(b) {
                bail!("{op}: output `{oname}` overlaps `{name}`");
            }
        }
    }
    Ok(())
}

impl CudaBackend {
    /// A backend on `device` with a new stream of its own, and a comm lane on another.
    pub fn new(device: &Arc<CudaDevice>) -> Result<CudaBackend> {
        let stats = Arc::new(MemoryStats::default());
        let lane = CudaBackend::on_new_stream(device, &stats, None)?;
        CudaBackend::on_new_stream(device, &stats, Some(Box::new(lane)))
    }

    fn on_new_stream(
        device: &Arc<CudaDevice>,
        stats: &Arc<MemoryStats>,
        lane: Option<Box<CudaBackend>>,
    ) -> Result<CudaBackend> {
        let stream = device
            .ctx
            .new_stream()
            .map_err(|e| anyhow!("creating a CUDA stream: {e:?}"))?;
        Ok(CudaBackend {
            device: device.clone(),
            stream,
            blas: OnceLock::new(),
            stats: stats.clone(),
            profiler: OpProfiler::default(),
            lane,
        })
    }

    fn blas(&self) -> Result<&Blas> {
        if let Some(b) = self.blas.get() {
            return Ok(b);
        }
        let made = Blas::new(&self.stream, &self.stats)?;
        Ok(self.blas.get_or_init(|| made))
    }

    /// Opens GPU `ordinal` and makes one backend on it (tests, the op check, single-rank tools).
    pub fn open(ordinal: usize) -> Result<CudaBackend> {
        CudaBackend::new(&CudaDevice::open(ordinal)?)
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// This backend's CUDA stream, for other CUDA libraries (NCCL) to issue work on.
    pub fn raw_stream(&self) -> cudarc::driver::sys::CUstream {
        self.stream.cu_stream()
    }

    /// Makes the device's context current on this thread (before calling other CUDA libraries).
    pub fn bind_context(&self) -> Result<()> {
        self.bind()
    }

    fn bind(&self) -> Result<()> {
        self.device
            .ctx
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context to this thread: {e:?}"))
    }

    fn raw_alloc(&self, bytes: usize) -> Result<DeviceMemory> {
        DeviceMemory::new(&self.stream, &self.stats, bytes)
    }

    fn run(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        args: &[Arg],
    ) -> Result<()> {
        launch(&self.device, &self.stream, name, grid, block, args)
    }

    /// A grid-stride kernel over `n` elements (nothing to do when `n` is 0).
    fn run_1d(&self, name: &str, n: usize, args: &[Arg]) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.run(name, (grid_for(n), 1, 1), (BLOCK, 1, 1), args)
    }

    fn timed<R>(&self, op: &'static str, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.profiler.time(&self.stream, op, f)
    }

    fn copy_host_to_device(&self, dst: u64, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: `dst` is a live allocation of at least `bytes.len()` bytes (callers checked the
        // length); the host slice outlives the copy because we synchronize before returning.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(dst, bytes, self.stream.cu_stream())
                .map_err(|e| anyhow!("copying to the GPU: {e:?}"))?;
        }
        self.synchronize()
    }
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Ids = CudaIds;
    type Event = CudaMark;

    fn name(&self) -> String {
        self.device.describe()
    }

    fn alloc(&self, len: usize, dtype: DType) -> Result<CudaBuf> {
        let bytes = len
            .checked_mul(dtype.size_bytes())
            .ok_or_else(|| anyhow!("alloc: {len} elements of {dtype} overflow"))?;
        let mem = Arc::new(self.raw_alloc(bytes)?);
        if bytes > 0 {
            // SAFETY: the allocation was just made on this stream with exactly `bytes` bytes.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    mem.ptr(),
                    0,
                    bytes,
                    self.stream.cu_stream(),
                )
            }
            .map_err(|e| anyhow!("zeroing a new GPU buffer: {e:?}"))?;
        }
        Ok(CudaBuf {
            mem,
            offset: 0,
            len,
            dtype,
        })
    }

    fn slice(&self, buf: &CudaBuf, offset: usize, len: usize) -> Result<CudaBuf> {
        buf.view(offset, len)
    }

    fn upload(&self, dst: &CudaBuf, src: &[f32]) -> Result<()> {
        expect_len("upload", "dst", dst, src.len())?;
        match dst.dtype {
            DType::F32 => self.copy_host_to_device(dst.ptr(), bytemuck::cast_slice(src)),
            DType::Bf16 => {
                let host: Vec<bf16> = src.iter().map(|&x| bf16::from_f32(x)).collect();
                self.copy_host_to_device(dst.ptr(), bytemuck::cast_slice(&host))
            }
        }
    }

    fn download(&self, src: &CudaBuf) -> Result<Vec<f32>> {
        self.bind()?;
        let mut bytes = vec![0u8; src.bytes()];
        if !bytes.is_empty() {
            // SAFETY: `src` covers `bytes.len()` bytes of a live allocation; the host buffer lives
            // until the synchronize below has waited for the copy.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(
                    &mut bytes,
                    src.ptr(),
                    self.stream.cu_stream(),
                )
                .map_err(|e| anyhow!("copying from the GPU: {e:?}"))?;
            }
        }
        self.synchronize()?;
        Ok(match src.dtype {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::Bf16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        })
    }

    fn upload_ids(&self, ids: &[u32]) -> Result<CudaIds> {
        let mem = Arc::new(self.raw_alloc(std::mem::size_of_val(ids))?);
        self.copy_host_to_device(mem.ptr(), bytemuck::cast_slice(ids))?;
        Ok(CudaIds {
            mem,
            host: Arc::new(ids.to_vec()),
        })
    }

    fn synchronize(&self) -> Result<()> {
        if let Some(lane) = &self.lane {
            lane.synchronize()?;
        }
        self.stream.synchronize().map_err(|e| {
            anyhow!(
                "the GPU reported an error while running queued work (a kernel fault surfaces at \
                 the next synchronize): {e:?}"
            )
        })?;
        self.device
            .ctx
            .check_err()
            .map_err(|e| anyhow!("an earlier GPU operation failed: {e:?}"))
    }

    fn record_event(&self) -> Result<CudaMark> {
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| anyhow!("recording a CUDA event: {e:?}"))?;
        Ok(CudaMark(Arc::new(event)))
    }

    fn wait_event(&self, event: &CudaMark) -> Result<()> {
        self.stream
            .wait(&event.0)
            .map_err(|e| anyhow!("making a CUDA stream wait for an event: {e:?}"))
    }

    fn comm_lane(&self) -> &Self {
        self.lane.as_deref().unwrap_or(self)
    }

    fn memory_in_use(&self) -> Option<(usize, usize)> {
        Some((self.stats.current(), self.stats.peak()))
    }

    fn set_op_timing(&self, on: bool) {
        self.profiler.set(on);
    }

    fn take_op_times(&self) -> Result<Vec<OpTime>> {
        self.synchronize()?;
        self.profiler.take()
    }

    fn timing_mark(&self) -> Result<TimingMark<CudaMark>> {
        // `record_event`'s events are made with CU_EVENT_DISABLE_TIMING (cheaper to wait on);
        // cuEventElapsedTime needs an event made with timing, so these are made on their own.
        let event = self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| anyhow!("recording a CUDA timing event: {e:?}"))?;
        Ok(TimingMark::Device(CudaMark(Arc::new(event))))
    }

    fn elapsed_ms(&self, start: &TimingMark<CudaMark>, end: &TimingMark<CudaMark>) -> Result<f64> {
        match (start, end) {
            // cuEventElapsedTime (cudarc waits for both events first): the GPU's clock between
            // the two points of the stream, about 0.5 us resolution.
            (TimingMark::Device(a), TimingMark::Device(b)) => {
                a.0.elapsed_ms(&b.0)
                    .map(f64::from)
                    .map_err(|e| anyhow!("reading the time between two CUDA events: {e:?}"))
            }
            _ => start.host_ms_to(end).ok_or_else(|| {
                anyhow!("elapsed_ms: a host mark and a CUDA event cannot be compared")
            }),
        }
    }

    fn set_comm_timing(&self, on: bool) {
        // Everything the comm lane runs is collectives' work (copies, reductions), and each op is
        // timed by its own events on the lane's stream, recorded after the lane's waits for the
        // ranks' inputs: their sum is the time the lane was busy, waits excluded.
        if let Some(lane) = &self.lane {
            lane.profiler.set(on);
        }
    }

    fn take_comm_busy_ms(&self) -> Result<Option<f64>> {
        match &self.lane {
            Some(lane) => {
                lane.synchronize()?;
                Ok(Some(lane.profiler.take()?.iter().map(|t| t.total_ms).sum()))
            }
            None => Ok(None),
        }
    }

    fn fill(&self, dst: &CudaBuf, value: f32) -> Result<()> {
        self.timed("fill", || {
            let name = format!("fill_{}", tn(dst.dtype));
            self.run_1d(
                &name,
                dst.len,
                &[ptr(dst), Arg::Float(value), long(dst.len)],
            )
        })
    }

    fn copy(&self, dst: &CudaBuf, src: &CudaBuf) -> Result<()> {
        expect_len("copy", "dst", dst, src.len)?;
        no_overlap("copy", &[("dst", dst)], &[("src", src)])?;
        self.timed("copy", || {
            let name = format!("copy_{}_{}", tn(dst.dtype), tn(src.dtype));
            self.run_1d(&name, dst.len, &[ptr(dst), ptr(src), long(dst.len)])
        })
    }

    fn scale(&self, dst: &CudaBuf, alpha: f32) -> Result<()> {
        self.timed("scale", || {
            let name = format!("scale_{}", tn(dst.dtype));
            self.run_1d(
                &name,
                dst.len,
                &[ptr(dst), Arg::Float(alpha), long(dst.len)],
            )
        })
    }

    fn add(&self, out: &CudaBuf, a: &CudaBuf, b: &CudaBuf) -> Result<()> {
        expect_len("add", "a", a, out.len)?;
        expect_len("add", "b", b, out.len)?;
        same_dtype("add", out.dtype, &[("a", a), ("b", b)])?;
        no_overlap("add", &[("out", out)], &[("a", a), ("b", b)])?;
        self.timed("add", || {
            let name = format!("add_{}", tn(out.dtype));
            self.run_1d(&name, out.len, &[ptr(out), ptr(a), ptr(b), long(out.len)])
        })
    }

    fn accumulate(&self, dst: &CudaBuf, src: &CudaBuf) -> Result<()> {
        expect_len("accumulate", "src", src, dst.len)?;
        no_overlap("accumulate", &[("dst", dst)], &[("src", src)])?;
        self.timed("accumulate", || {
            let name = format!("accumulate_{}_{}", tn(dst.dtype), tn(src.dtype));
            self.run_1d(&name, dst.len, &[ptr(dst), ptr(src), long(dst.len)])
        })
    }

    fn matmul(
        &self,
        out: &CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        bias: Option<&CudaBuf>,
        spec: MatmulSpec,
    ) -> Result<()> {
        shapes::matmul(out, a, b, bias, spec)?;
        let mut ins = vec![("a", a), ("b", b)];
        if let Some(bias) = bias {
            ins.push(("bias", bias));
        }
        no_overlap("matmul", &[("out", out)], &ins)?;
        if spec.m == 0 || spec.n == 0 {
            return Ok(());
        }
        if spec.k == 0 {
            // An empty sum: out = 0 (+ bias). cuBLASLt rejects k = 0.
            if bias.is_some() {
                bail!("matmul: k = 0 with a bias is not supported on CUDA");
            }
            return if spec.accumulate {
                Ok(())
            } else {
                self.fill(out, 0.0)
            };
        }
        self.bind()?;
        self.timed("matmul", || self.blas()?.matmul(out, a, b, bias, spec))
    }

    fn bias_backward(
        &self,
        dbias: &CudaBuf,
        dout: &CudaBuf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        expect_len("bias_backward", "dbias", dbias, cols)?;
        expect_len("bias_backward", "dout", dout, rows * cols)?;
        no_overlap("bias_backward", &[("dbias", dbias)], &[("dout", dout)])?;
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        self.timed("bias_backward", || {
            let chunks = rows.div_ceil(ROWS_PER_CHUNK);
            let partial = self.alloc(chunks * cols, DType::F32)?;
            self.run(
                &format!("column_partial_sums_{}", tn(dout.dtype)),
                (cols.div_ceil(32) as u32, chunks as u32, 1),
                (32, 8, 1),
                &[
                    ptr(&partial),
                    ptr(dout),
                    int("rows", rows)?,
                    int("cols", cols)?,
                    int("rows per chunk", ROWS_PER_CHUNK)?,
                ],
            )?;
            self.run_1d(
                &format!("accumulate_column_sums_{}", tn(dbias.dtype)),
                cols,
                &[
                    ptr(dbias),
                    ptr(&partial),
                    int("chunks", chunks)?,
                    int("cols", cols)?,
                ],
            )
        })
    }

    fn layernorm_forward(
        &self,
        out: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: &CudaBuf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let op = "layernorm_forward";
        shapes::layernorm_forward(out, mean, rstd, inp, weight, bias, rows, cols)?;
        same_dtype(
            op,
            out.dtype,
            &[("inp", inp), ("weight", weight), ("bias", bias)],
        )?;
        no_overlap(
            op,
            &[("out", out), ("mean", mean), ("rstd", rstd)],
            &[("inp", inp), ("weight", weight), ("bias", bias)],
        )?;
        if rows == 0 {
            return Ok(());
        }
        self.timed(op, || {
            self.run(
                &format!("layernorm_forward_{}", tn(out.dtype)),
                (rows as u32, 1, 1),
                (row_block(cols, 256), 1, 1),
                &[
                    ptr(out),
                    ptr(mean),
                    ptr(rstd),
                    ptr(inp),
                    ptr(weight),
                    ptr(bias),
                    int("rows", rows)?,
                    int("cols", cols)?,
                ],
            )
        })
    }

    fn layernorm_backward(
        &self,
        dinp: &CudaBuf,
        dweight: &CudaBuf,
        dbias: &CudaBuf,
        dout: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let op = "layernorm_backward";
        shapes::layernorm_backward(
            dinp, dweight, dbias, dout, inp, weight, mean, rstd, rows, cols,
        )?;
        same_dtype(
            op,
            dinp.dtype,
            &[("dout", dout), ("inp", inp), ("weight", weight)],
        )?;
        same_dtype(op, dweight.dtype, &[("dbias", dbias)])?;
        no_overlap(
            op,
            &[("dinp", dinp), ("dweight", dweight), ("dbias", dbias)],
            &[
                ("dout", dout),
                ("inp", inp),
                ("weight", weight),
                ("mean", mean),
                ("rstd", rstd),
            ],
        )?;
        if rows == 0 {
            return Ok(());
        }
        let (rows_i, cols_i) = (int("rows", rows)?, int("cols", cols)?);
        self.timed(op, || {
            self.run(
                &format!("layernorm_backward_input_{}", tn(dinp.dtype)),
                (rows as u32, 1, 1),
                (row_block(cols, 256), 1, 1),
                &[
                    ptr(dinp),
                    ptr(dout),
                    ptr(inp),
                    ptr(weight),
                    ptr(mean),
                    ptr(rstd),
                    rows_i,
                    cols_i,
                ],
            )?;
            self.run(
                &format!(
                    "layernorm_backward_params_{}_{}",
                    tn(dout.dtype),
                    tn(dweight.dtype)
                ),
                (cols.div_ceil(32) as u32, 1, 1),
                (32, 8, 1),
                &[
                    ptr(dweight),
                    ptr(dbias),
                    ptr(dout),
                    ptr(inp),
                    ptr(mean),
                    ptr(rstd),
                    rows_i,
                    cols_i,
                ],
            )
        })
    }

    fn gelu_forward(&self, out: &CudaBuf, inp: &CudaBuf) -> Result<()> {
        expect_len("gelu_forward", "inp", inp, out.len)?;
        same_dtype("gelu_forward", out.dtype, &[("inp", inp)])?;
        no_overlap("gelu_forward", &[("out", out)], &[("inp", inp)])?;
        self.timed("gelu_forward", || {
            let name = format!("gelu_forward_{}", tn(out.dtype));
            self.run_1d(&name, out.len, &[ptr(out), ptr(inp), long(out.len)])
        })
    }

    fn gelu_backward(&self, dinp: &CudaBuf, inp: &CudaBuf, dout: &CudaBuf) -> Result<()> {
        expect_len("gelu_backward", "inp", inp, dinp.len)?;
        expect_len("gelu_backward", "dout", dout, dinp.len)?;
        same_dtype("gelu_backward", dinp.dtype, &[("inp", inp), ("dout", dout)])?;
        no_overlap(
            "gelu_backward",
            &[("dinp", dinp)],
            &[("inp", inp), ("dout", dout)],
        )?;
        self.timed("gelu_backward", || {
            let name = format!("gelu_backward_{}", tn(dinp.dtype));
            self.run_1d(
                &name,
                dinp.len,
                &[ptr(dinp), ptr(inp), ptr(dout), long(dinp.len)],
            )
        })
    }

    fn attention_forward(
        &self,
        out: &CudaBuf,
        lse: &CudaBuf,
        qkv: &CudaBuf,
        shape: AttentionShape,
    ) -> Result<()> {
        let op = "attention_forward";
        shapes::attention_forward(out, lse, qkv, shape)?;
        let tokens = shape.batch * shape.seq;
        same_dtype(op, out.dtype, &[("qkv", qkv)])?;
        no_overlap(op, &[("out", out), ("lse", lse)], &[("qkv", qkv)])?;
        let hs = attention_head_size(op, shape)?;
        if tokens == 0 || shape.heads == 0 {
            return Ok(());
        }
        let grid = attention_grid(shape);
        self.timed(op, || {
            self.run(
                &format!("attention_forward_{}_hs{hs}", tn(out.dtype)),
                grid,
                (ATTENTION_TILE, 1, 1),
                &[
                    ptr(out),
                    ptr(lse),
                    ptr(qkv),
                    int("seq", shape.seq)?,
                    int("heads", shape.heads)?,
                ],
            )
        })
    }

    fn attention_backward(
        &self,
        dqkv: &CudaBuf,
        dout: &CudaBuf,
        qkv: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        shape: AttentionShape,
    ) -> Result<()> {
        let op = "attention_backward";
        shapes::attention_backward(dqkv, dout, qkv, out, lse, shape)?;
        let tokens = shape.batch * shape.seq;
        same_dtype(
            op,
            dqkv.dtype,
            &[("dout", dout), ("qkv", qkv), ("out", out)],
        )?;
        no_overlap(
            op,
            &[("dqkv", dqkv)],
            &[("dout", dout), ("qkv", qkv), ("out", out), ("lse", lse)],
        )?;
        let hs = attention_head_size(op, shape)?;
        if tokens == 0 || shape.heads == 0 {
            return Ok(());
        }
        let t = tn(dqkv.dtype);
        let (seq, heads) = (int("seq", shape.seq)?, int("heads", shape.heads)?);
        let grid = attention_grid(shape);
        self.timed(op, || {
            let d = self.alloc(tokens * shape.heads, DType::F32)?;
            self.run_1d(
                &format!("attention_backward_preprocess_{t}_hs{hs}"),
                tokens * shape.heads,
                &[
                    ptr(&d),
                    ptr(dout),
                    ptr(out),
                    int("batch", shape.batch)?,
                    seq,
                    heads,
                ],
            )?;
            let args = [
                ptr(dqkv),
                ptr(dout),
                ptr(qkv),
                ptr(lse),
                ptr(&d),
                seq,
                heads,
            ];
            self.run(
                &format!("attention_backward_dkdv_{t}_hs{hs}"),
                grid,
                (ATTENTION_TILE, 1, 1),
                &args,
            )?;
            self.run(
                &format!("attention_backward_dq_{t}_hs{hs}"),
                grid,
                (ATTENTION_TILE, 1, 1),
                &args,
            )
        })
    }

    fn embedding_forward(
        &self,
        out: &CudaBuf,
        ids: &CudaIds,
        wte: &CudaBuf,
        wpe: &CudaBuf,
        batch: usize,
        seq: usize,
        channels: usize,
    ) -> Result<()> {
        let op = "embedding_forward";
        shapes::embedding(op, &ids.host, wte, wpe, ("out", out), batch, seq, channels)?;
        same_dtype(op, out.dtype, &[("wte", wte), ("wpe", wpe)])?;
        no_overlap(op, &[("out", out)], &[("wte", wte), ("wpe", wpe)])?;
        self.timed(op, || {
            self.run_1d(
                &format!("embedding_forward_{}", tn(out.dtype)),
                out.len,
                &[
                    ptr(out),
                    Arg::Ptr(ids.ptr()),
                    ptr(wte),
                    ptr(wpe),
                    int("batch", batch)?,
                    int("seq", seq)?,
                    int("channels", channels)?,
                ],
            )
        })
    }

    fn embedding_backward(
        &self,
        dwte: &CudaBuf,
        dwpe: &CudaBuf,
        dout: &CudaBuf,
        ids: &CudaIds,
        batch: usize,
        seq: usize,
        channels: usize,
    ) -> Result<()> {
        let op = "embedding_backward";
        shapes::embedding(
            op,
            &ids.host,
            dwte,
            dwpe,
            ("dout", dout),
            batch,
            seq,
            channels,
        )?;
        same_dtype(op, dwte.dtype, &[("dwpe", dwpe)])?;
        no_overlap(op, &[("dwte", dwte), ("dwpe", dwpe)], &[("dout", dout)])?;
        let kind = format!("{}_{}", tn(dwte.dtype), tn(dout.dtype));
        self.timed(op, || {
            self.run_1d(
                &format!("embedding_backward_positions_{kind}"),
                seq * channels,
                &[
                    ptr(dwpe),
                    ptr(dout),
                    int("batch", batch)?,
                    int("seq", seq)?,
                    int("channels", channels)?,
                ],
            )?;
            self.run_1d(
                &format!("embedding_backward_tokens_{kind}"),
                batch * seq * channels,
                &[
                    ptr(dwte),
                    Arg::Ptr(ids.ptr()),
                    ptr(dout),
                    int("tokens", batch * seq)?,
                    int("channels", channels)?,
                ],
            )
        })
    }

    fn cross_entropy(
        &self,
        losses: &CudaBuf,
        logits: &CudaBuf,
        targets: &CudaIds,
        rows: usize,
        vocab: usize,
        grad_scale: Option<f32>,
    ) -> Result<()> {
        let op = "cross_entropy";
        shapes::cross_entropy(losses, logits, &targets.host, rows, vocab)?;
        no_overlap(op, &[("losses", losses), ("logits", logits)], &[])?;
        if rows == 0 {
            return Ok(());
        }
        self.timed(op, || {
            self.run(
                &format!("cross_entropy_{}", tn(logits.dtype)),
                (rows as u32, 1, 1),
                (row_block(vocab, 1024), 1, 1),
                &[
                    ptr(losses),
                    ptr(logits),
                    Arg::Ptr(targets.ptr()),
                    int("rows", rows)?,
                    int("vocab", vocab)?,
                    Arg::Float(grad_scale.unwrap_or(0.0)),
                    Arg::Int(grad_scale.is_some() as i32),
                ],
            )
        })
    }

    fn adamw(
        &self,
        param: &CudaBuf,
        grad: &CudaBuf,
        m: &CudaBuf,
        v: &CudaBuf,
        param_copy: Option<&CudaBuf>,
        hp: &AdamWStep,
    ) -> Result<()> {
        let op = "adamw";
        shapes::adamw(param, grad, m, v, param_copy)?;
        let n = param.len;
        let mut outs = vec![("param", param), ("m", m), ("v", v)];
        if let Some(c) = param_copy {
            outs.push(("param_copy", c));
        }
        no_overlap(op, &outs, &[("grad", grad)])?;
        // Bias corrections in f64 on the host, as the CPU reference computes them.
        let step = hp.step.max(1) as i32;
        let bc1 = 1.0 - (hp.beta1 as f64).powi(step);
        let bc2 = 1.0 - (hp.beta2 as f64).powi(step);
        let copy_dtype = param_copy.map_or(DType::F32, |c| c.dtype);
        self.timed(op, || {
            self.run_1d(
                &format!("adamw_{}_{}", tn(grad.dtype), tn(copy_dtype)),
                n,
                &[
                    ptr(param),
                    ptr(grad),
                    ptr(m),
                    ptr(v),
                    Arg::Ptr(param_copy.map_or(0, |c| c.ptr())),
                    long(n),
                    Arg::Float(hp.lr),
                    Arg::Float(hp.beta1),
                    Arg::Float(hp.beta2),
                    Arg::Float(hp.eps),
                    Arg::Float(hp.weight_decay),
                    Arg::Float(bc1 as f32),
                    Arg::Float(bc2 as f32),
                    Arg::Float(hp.grad_scale),
                ],
            )
        })
    }

    fn sum_squares(&self, acc: &CudaBuf, x: &CudaBuf) -> Result<()> {
        expect_len("sum_squares", "acc", acc, 1)?;
        expect_dtype("sum_squares", "acc", acc, DType::F32)?;
        no_overlap("sum_squares", &[("acc", acc)], &[("x", x)])?;
        if x.len == 0 {
            return Ok(());
        }
        self.timed("sum_squares", || {
            // One partial sum per block, added atomically: a bounded grid keeps the adds few.
            let blocks = grid_for(x.len).min(1024);
            self.run(
                &format!("sum_squares_{}", tn(x.dtype)),
                (blocks, 1, 1),
                (BLOCK, 1, 1),
                &[ptr(acc), ptr(x), long(x.len)],
            )
        })
    }
}

/// The head sizes the attention kernels are instantiated for.
fn attention_head_size(op: &str, shape: AttentionShape) -> Result<usize> {
    match shape.head_dim {
        32 | 64 => Ok(shape.head_dim),
        hs => bail!(
            "{op}: head_dim {hs} is not supported by the CUDA attention kernels (32 or 64); \
             choose d_model / n_head accordingly"
        ),
    }
}

/// Grid of the tiled attention kernels: (query or key tiles, batch x heads).
fn attention_grid(shape: AttentionShape) -> (u32, u32, u32) {
    (
        (shape.seq as u32).div_ceil(ATTENTION_TILE),
        (shape.batch * shape.heads) as u32,
        1,
    )
}
