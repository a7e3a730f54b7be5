//! cuDNN's convolution input gradient (its "backward data") on NCHW tensors, with libcudnn
//! loaded at run time: the binary neither links nor needs it, and where it is not found the
//! input gradients take the built-in path (a convolution by the flipped kernel, im2col and a
//! GEMM: `cuda.rs`). The library is looked for as `SINGLORA_CUDNN` names it (a path; `off`
//! keeps the built-in path) or as `libcudnn.so.9` on the loader's search path (PyTorch's wheels
//! carry one: `nvidia/cudnn/lib` in its environment).
//!
//! Only the input gradient: at the U-Net's sizes on an H100 (cuDNN 9.19, batch 4, 320
//! channels at 64 × 64, bf16), this API's search timed its fastest forward at 0.42 ms, where the
//! built-in forward takes 0.22 ms, and its input gradient at 0.27 ms, where the built-in one
//! takes 0.8 ms; a U-Net step with cuDNN's forward too was 5 ms slower.
//!
//! Each shape is planned once per thread and stream: descriptors, and the algorithm cuDNN's
//! own timing finds fastest among the deterministic ones (bf16 through tensor cores; f32
//! without TF32, FFT or Winograd, so that it stays within f32 rounding of the CPU's result).
//! Plans, descriptors and handles live as long as the process. `SINGLORA_CUDNN_LOG=1` prints
//! each search's results.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use candle_core::cuda_backend::CudaDevice;

use crate::ops::cuda::fresh;

type Status = c_int;
type Handle = *mut c_void;
type Desc = *mut c_void;

const DATA_FLOAT: c_int = 0;
const DATA_BFLOAT16: c_int = 9;
const TENSOR_NCHW: c_int = 0;
const CROSS_CORRELATION: c_int = 1;
const TENSOR_OP_MATH: c_int = 1;
const FMA_MATH: c_int = 3;
const DETERMINISTIC: c_int = 1;
/// The plain GEMM-based input-gradient algorithm (0, the other, is not deterministic): the
/// one f32 may take.
const F32_ALGOS: [c_int; 1] = [1];
/// A plan's workspace is at most this many bytes.
const MAX_WORKSPACE: usize = 512 << 20;

/// cuDNN's `cudnnConvolutionBwdDataAlgoPerf_t`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct AlgoPerf {
    algo: c_int,
    status: Status,
    time: f32,
    memory: usize,
    determinism: c_int,
    math_type: c_int,
    reserved: [c_int; 3],
}

/// cudnnFindConvolutionBackwardDataAlgorithm: (handle, w, dy, conv, dx, wanted, found, results)
type FindFn = unsafe extern "C" fn(
    Handle,
    Desc,
    Desc,
    Desc,
    Desc,
    c_int,
    *mut c_int,
    *mut AlgoPerf,
) -> Status;
/// cudnnConvolutionBackwardData: (handle, α, w, w, dy, dy, conv, algo, workspace, bytes, β,
/// dx, dx)
type RunFn = unsafe extern "C" fn(
    Handle,
    *const c_void,
    Desc,
    *const c_void,
    Desc,
    *const c_void,
    Desc,
    c_int,
    *mut c_void,
    usize,
    *const c_void,
    Desc,
    *mut c_void,
) -> Status;

/// The entry points used here.
struct Api {
    version: usize,
    create: unsafe extern "C" fn(*mut Handle) -> Status,
    set_stream: unsafe extern "C" fn(Handle, *mut c_void) -> Status,
    error_string: unsafe extern "C" fn(Status) -> *const c_char,
    create_tensor: unsafe extern "C" fn(*mut Desc) -> Status,
    set_tensor: unsafe extern "C" fn(Desc, c_int, c_int, c_int, c_int, c_int, c_int) -> Status,
    create_filter: unsafe extern "C" fn(*mut Desc) -> Status,
    set_filter: unsafe extern "C" fn(Desc, c_int, c_int, c_int, c_int, c_int, c_int) -> Status,
    create_conv: unsafe extern "C" fn(*mut Desc) -> Status,
    #[allow(clippy::type_complexity)]
    set_conv: unsafe extern "C" fn(
        Desc,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
    ) -> Status,
    set_math: unsafe extern "C" fn(Desc, c_int) -> Status,
    find_backward_data: FindFn,
    backward_data: RunFn,
    _lib: libloading::Library,
}

// SAFETY: the function pointers and the library handle are plain addresses; cuDNN's entry
// points may be called from any thread (handles are per thread here).
unsafe impl Send for Api {}
unsafe impl Sync for Api {}

static API: OnceLock<Option<Api>> = OnceLock::new();
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Loads cuDNN (once); `None` where it is switched off or not found.
fn load() -> Option<Api> {
    let named = std::env::var("SINGLORA_CUDNN").ok();
    let names: Vec<String> = match named.as_deref() {
        Some("off" | "0" | "no" | "false") => return None,
        Some(path) if !path.is_empty() => vec![path.to_string()],
        _ => vec!["libcudnn.so.9".into(), "libcudnn.so".into()],
    };
    let fallback = "convolutions' input gradients take the built-in path";
    for name in names {
        // SAFETY: loading runs the library's initialisers; libcudnn's have no preconditions.
        let lib = match unsafe { libloading::Library::new(&name) } {
            Ok(lib) => lib,
            Err(e) => {
                // a path the user named and that does not load is worth saying
                if matches!(named.as_deref(), Some(p) if !p.is_empty()) {
                    eprintln!("note: SINGLORA_CUDNN={name} does not load ({e}): {fallback}");
                }
                continue;
            }
        };
        match bind(lib) {
            Ok(api) if api.version >= 90000 => return Some(api),
            Ok(api) => eprintln!(
                "note: {name} is cuDNN {}, 9 or newer is needed: {fallback}",
                api.version
            ),
            Err(e) => eprintln!("note: {name} lacks {e}: {fallback}"),
        }
    }
    None
}

/// The entry points of a loaded libcudnn, or the name of one it lacks.
fn bind(lib: libloading::Library) -> Result<Api, String> {
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: each symbol is cuDNN's function of the declared signature (cudnn.h).
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }.map_err(|_| $name.to_string())?
        };
    }
    let get_version: unsafe extern "C" fn() -> usize = sym!("cudnnGetVersion");
    Ok(Api {
        // SAFETY: cudnnGetVersion takes nothing and only reads a constant.
        version: unsafe { get_version() },
        create: sym!("cudnnCreate"),
        set_stream: sym!("cudnnSetStream"),
        error_string: sym!("cudnnGetErrorString"),
        create_tensor: sym!("cudnnCreateTensorDescriptor"),
        set_tensor: sym!("cudnnSetTensor4dDescriptor"),
        create_filter: sym!("cudnnCreateFilterDescriptor"),
        set_filter: sym!("cudnnSetFilter4dDescriptor"),
        create_conv: sym!("cudnnCreateConvolutionDescriptor"),
        set_conv: sym!("cudnnSetConvolution2dDescriptor"),
        set_math: sym!("cudnnSetConvolutionMathType"),
        find_backward_data: sym!("cudnnFindConvolutionBackwardDataAlgorithm"),
        backward_data: sym!("cudnnConvolutionBackwardData"),
        _lib: lib,
    })
}

fn api() -> Option<&'static Api> {
    if !ENABLED.load(Ordering::Relaxed) {
        return None;
    }
    API.get_or_init(load).as_ref()
}

/// Switches cuDNN's input gradients on (the default, where the library is found) or off for
/// this process (the device check and the benchmarks compare both paths).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// cuDNN's version (e.g. 91002 for 9.10.2) where its input gradients are on and it was found.
pub fn version() -> Option<usize> {
    api().map(|a| a.version)
}

fn check(api: &Api, status: Status, what: &str) -> candle_core::Result<()> {
    if status == 0 {
        return Ok(());
    }
    // SAFETY: cudnnGetErrorString returns a static string for any status.
    let msg = unsafe { CStr::from_ptr((api.error_string)(status)) };
    candle_core::bail!(
        "cuDNN {what}: {} (SINGLORA_CUDNN=off takes the built-in path)",
        msg.to_string_lossy()
    )
}

/// A convolution's shape: input (b, c, h, w), kernel (co, c, k, k), its padding and stride.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct ConvShape {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub co: usize,
    pub k: usize,
    pub padding: usize,
    pub stride: usize,
}

impl ConvShape {
    /// The output's side.
    pub fn out_hw(&self) -> (usize, usize) {
        let side = |n: usize| (n + 2 * self.padding - self.k) / self.stride + 1;
        (side(self.h), side(self.w))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    stream: usize,
    bf16: bool,
    shape: ConvShape,
}

#[derive(Clone, Copy)]
struct Plan {
    x: Desc,
    w: Desc,
    conv: Desc,
    y: Desc,
    algo: c_int,
    workspace: usize,
}

#[derive(Default)]
struct State {
    handles: HashMap<usize, Handle>,
    plans: HashMap<Key, Option<Plan>>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// This thread's handle on the device's stream.
fn handle(api: &Api, st: &mut State, dev: &CudaDevice) -> candle_core::Result<Handle> {
    let stream = dev.cuda_stream().cu_stream();
    if let Some(&h) = st.handles.get(&(stream as usize)) {
        return Ok(h);
    }
    let mut h: Handle = std::ptr::null_mut();
    // SAFETY: cudnnCreate writes the new handle; the stream is the device's, alive as long as
    // the device (and the handle is only used with it).
    unsafe {
        check(api, (api.create)(&mut h), "cudnnCreate")?;
        check(
            api,
            (api.set_stream)(h, stream as *mut c_void),
            "cudnnSetStream",
        )?;
    }
    st.handles.insert(stream as usize, h);
    Ok(h)
}

/// The shape's plan on this handle: `None` where cuDNN has no deterministic algorithm for it
/// within the workspace limit (the caller takes the built-in path).
fn plan(api: &Api, h: Handle, key: &Key) -> candle_core::Result<Option<Plan>> {
    let s = key.shape;
    let (ho, wo) = s.out_hw();
    let dims = [s.b, s.c, s.h, s.w, s.co, s.k, s.padding, s.stride, ho, wo];
    if dims.iter().any(|&d| d > i32::MAX as usize) || s.b * s.c * s.h * s.w > i32::MAX as usize {
        return Ok(None);
    }
    let i = |n: usize| n as c_int;
    let dt = if key.bf16 { DATA_BFLOAT16 } else { DATA_FLOAT };
    let mut p = Plan {
        x: std::ptr::null_mut(),
        w: std::ptr::null_mut(),
        conv: std::ptr::null_mut(),
        y: std::ptr::null_mut(),
        algo: 0,
        workspace: 0,
    };
    let math = if key.bf16 { TENSOR_OP_MATH } else { FMA_MATH };
    const WANTED: usize = 16;
    let mut found = [AlgoPerf::default(); WANTED];
    let mut n: c_int = 0;
    // SAFETY: each create writes one descriptor; the sets take them with in-range values; the
    // search writes at most WANTED results and their count, timing on buffers it allocates.
    unsafe {
        check(api, (api.create_tensor)(&mut p.x), "tensor descriptor")?;
        check(api, (api.create_tensor)(&mut p.y), "tensor descriptor")?;
        check(api, (api.create_filter)(&mut p.w), "filter descriptor")?;
        check(
            api,
            (api.create_conv)(&mut p.conv),
            "convolution descriptor",
        )?;
        let x = (api.set_tensor)(p.x, TENSOR_NCHW, dt, i(s.b), i(s.c), i(s.h), i(s.w));
        check(api, x, "input descriptor")?;
        let y = (api.set_tensor)(p.y, TENSOR_NCHW, dt, i(s.b), i(s.co), i(ho), i(wo));
        check(api, y, "output descriptor")?;
        let w = (api.set_filter)(p.w, dt, TENSOR_NCHW, i(s.co), i(s.c), i(s.k), i(s.k));
        check(api, w, "kernel descriptor")?;
        let (pad, st) = (i(s.padding), i(s.stride));
        let c = (api.set_conv)(
            p.conv,
            pad,
            pad,
            st,
            st,
            1,
            1,
            CROSS_CORRELATION,
            DATA_FLOAT,
        );
        check(api, c, "convolution descriptor")?;
        check(api, (api.set_math)(p.conv, math), "math type")?;
        let status = (api.find_backward_data)(
            h,
            p.w,
            p.y,
            p.conv,
            p.x,
            WANTED as c_int,
            &mut n,
            found.as_mut_ptr(),
        );
        check(api, status, "algorithm search")?;
    }
    // the results come fastest first
    let best = found[..(n.max(0) as usize).min(WANTED)].iter().find(|r| {
        r.status == 0
            && r.determinism == DETERMINISTIC
            && r.memory <= MAX_WORKSPACE
            && (key.bf16 || (r.math_type == FMA_MATH && F32_ALGOS.contains(&r.algo)))
    });
    if std::env::var_os("SINGLORA_CUDNN_LOG").is_some() {
        eprintln!("cuDNN input gradient {s:?} bf16={}:", key.bf16);
        for r in &found[..(n.max(0) as usize).min(WANTED)] {
            eprintln!(
                "  algo {} status {} {:.4} ms {} B det {} math {}",
                r.algo, r.status, r.time, r.memory, r.determinism, r.math_type
            );
        }
    }
    let Some(best) = best else {
        return Ok(None);
    };
    // SAFETY: the descriptor is ours; the math type is the one the algorithm was timed with.
    unsafe { check(api, (api.set_math)(p.conv, best.math_type), "math type")? };
    p.algo = best.algo;
    p.workspace = best.memory;
    Ok(Some(p))
}

/// Runs `f` with this thread's plan for `shape` (made on first use) and handle; `Ok(None)`
/// where cuDNN is off or not found or has no plan for the shape.
fn with_plan<T>(
    dev: &CudaDevice,
    bf16: bool,
    shape: ConvShape,
    f: impl FnOnce(&Api, Handle, &Plan) -> candle_core::Result<T>,
) -> candle_core::Result<Option<T>> {
    let Some(api) = api() else {
        return Ok(None);
    };
    let (h, p) = STATE.with(|st| -> candle_core::Result<_> {
        let st = &mut *st.borrow_mut();
        let h = match handle(api, st, dev) {
            Ok(h) => h,
            Err(e) => {
                // no handle on this device: the built-in path from here on
                eprintln!("note: {e}; convolutions' input gradients take the built-in path");
                set_enabled(false);
                return Ok((std::ptr::null_mut(), None));
            }
        };
        let key = Key {
            stream: dev.cuda_stream().cu_stream() as usize,
            bf16,
            shape,
        };
        let p = match st.plans.get(&key) {
            Some(p) => *p,
            None => {
                // a shape cuDNN cannot plan takes the built-in path (once told, not retried)
                let p = plan(api, h, &key).unwrap_or_else(|e| {
                    eprintln!(
                        "note: {e} for {shape:?}; its input gradient takes the built-in path"
                    );
                    None
                });
                st.plans.insert(key, p);
                p
            }
        };
        Ok((h, p))
    })?;
    match p {
        Some(p) => f(api, h, &p).map(Some),
        None => Ok(None),
    }
}

/// Whether cuDNN takes this convolution's input gradient (its plan is made here if it was not).
pub(super) fn takes_input_grad(dev: &CudaDevice, bf16: bool, shape: ConvShape) -> bool {
    matches!(with_plan(dev, bf16, shape, |_, _, _| Ok(())), Ok(Some(())))
}

/// dx (b, c, h, w) = the input gradient of the convolution `shape` for the output gradient dy
/// (b, co, ho, wo) and kernel W (co, c, k, k), all of the storage type, contiguous. Returns
/// false, having done nothing, where cuDNN does not take the convolution.
///
/// # Safety
/// The pointers must address live device buffers of the shape's sizes on the device's stream.
pub(super) unsafe fn input_grad(
    dev: &CudaDevice,
    bf16: bool,
    shape: ConvShape,
    (dy, w, dx): (u64, u64, u64),
) -> candle_core::Result<bool> {
    let done = with_plan(dev, bf16, shape, |api, h, p| {
        let ws = match p.workspace {
            0 => None,
            n => Some(fresh(dev, false, n.div_ceil(4))?),
        };
        let wsp = ws.as_ref().map_or(0, |w| w.1) as *mut c_void;
        let (one, zero) = (1f32, 0f32);
        let (alpha, beta) = (
            &one as *const f32 as *const c_void,
            &zero as *const f32 as *const c_void,
        );
        let (dyp, wp, dxp) = (dy as *const c_void, w as *const c_void, dx as *mut c_void);
        // SAFETY: the caller's buffers match the plan's descriptors; the workspace is the
        // plan's size and freed in stream order after the call.
        let status = unsafe {
            (api.backward_data)(
                h,
                alpha,
                p.w,
                wp,
                p.y,
                dyp,
                p.conv,
                p.algo,
                wsp,
                p.workspace,
                beta,
                p.x,
                dxp,
            )
        };
        drop(ws);
        check(api, status, "input gradient")
    })?;
    Ok(done.is_some())
}
