//! The conformance suite every kiln backend runs, in the manner of candle's `test_device!`:
//! one line in a backend crate's `tests/conformance.rs` generates the tests.
//!
//! ```ignore
//! use kiln_backend_cpu as _; // link the backend: its registration must be in the binary
//! kiln_backend_conformance::backend_conformance!(cpu_tests, "cpu");
//! ```
//!
//! The tests select the device through kiln's registry, as training does, and check:
//! a forward pass of a small MLP (against the CPU), the backward pass (gradients exist and
//! match the CPU's), optimizer steps (a hand-written SGD with candle ops: parameters
//! change as on the CPU and the loss falls), a checkpoint round trip of the parameters
//! through `kiln_formats::safetensors::save` and back onto the device (bit-equal), the
//! host snapshot an asynchronous checkpoint takes (pinned where offered; bit-equal), each
//! advertised dtype, and bit-identical repeated runs when the backend says it is
//! deterministic.
//!
//! A backend that is registered but unavailable on this machine (`cuda` without a GPU)
//! makes every test print why and pass; one that is not registered at all fails, since
//! that is the linking mistake the suite is there to catch.
#![deny(missing_docs)]

use candle_core::{DType, Device, Tensor, Var};
use kiln_backend::{HostSnapshot, Selected};

/// Generates the suite for one device string as a module of `#[test]`s:
/// `backend_conformance!(cuda_tests, "cuda")`.
#[macro_export]
macro_rules! backend_conformance {
    ($module:ident, $spec:expr) => {
        mod $module {
            #[test]
            fn forward() {
                $crate::run($spec, "forward", $crate::forward);
            }
            #[test]
            fn backward() {
                $crate::run($spec, "backward", $crate::backward);
            }
            #[test]
            fn optimizer_step() {
                $crate::run($spec, "optimizer_step", $crate::optimizer_step);
            }
            #[test]
            fn checkpoint_roundtrip() {
                $crate::run($spec, "checkpoint_roundtrip", $crate::checkpoint_roundtrip);
            }
            #[test]
            fn host_snapshot() {
                $crate::run($spec, "host_snapshot", $crate::host_snapshot);
            }
            #[test]
            fn dtypes() {
                $crate::run($spec, "dtypes", $crate::dtypes);
            }
            #[test]
            fn deterministic() {
                $crate::run($spec, "deterministic", $crate::deterministic);
            }
        }
    };
}

/// Why a check failed.
#[derive(Debug)]
pub struct Failure(pub String);

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<candle_core::Error> for Failure {
    fn from(e: candle_core::Error) -> Self {
        Failure(format!("candle: {e}"))
    }
}

impl From<kiln_formats::Error> for Failure {
    fn from(e: kiln_formats::Error) -> Self {
        Failure(format!("kiln-formats: {e}"))
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure(format!("io: {e}"))
    }
}

/// A check's result.
pub type Check = Result<(), Failure>;

/// What the suite does with a device string.
#[derive(Debug)]
pub enum Setup {
    /// Run the checks on this device.
    Run(Box<Selected>),
    /// Skip them, for this reason (compiled in, not available here).
    Skip(String),
}

/// Selects `spec` through the registry: a device, a reason to skip (the backend is
/// registered but unavailable), or an error (anything else).
pub fn setup(spec: &str) -> Result<Setup, Failure> {
    match kiln_backend::select(spec) {
        Ok(s) => Ok(Setup::Run(Box::new(s))),
        Err(e @ kiln_backend::Error::Unavailable { .. }) => Ok(Setup::Skip(e.to_string())),
        Err(e) => Err(Failure(e.to_string())),
    }
}

/// Runs one check on `spec`, printing the reason when it is skipped; panics on failure
/// (it is called from the generated `#[test]`s).
pub fn run(spec: &str, name: &str, check: fn(&Selected) -> Check) {
    match setup(spec) {
        Ok(Setup::Run(s)) => {
            if let Err(e) = check(&s) {
                panic!("{spec} {name}: {e}");
            }
        }
        Ok(Setup::Skip(reason)) => println!("skipped {spec} {name}: {reason}"),
        Err(e) => panic!("{spec} {name}: {e}"),
    }
}

/// Inputs that need no random generator: a fixed pattern in [-0.5, 0.5).
fn pattern(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

/// The small MLP: 3 inputs, 8 hidden units (ReLU), 2 outputs.
struct Mlp {
    params: Vec<(&'static str, Var)>,
}

const SHAPES: [(&str, &[usize]); 4] = [
    ("fc1.weight", &[3, 8]),
    ("fc1.bias", &[8]),
    ("fc2.weight", &[8, 2]),
    ("fc2.bias", &[2]),
];

impl Mlp {
    fn new(device: &Device) -> Result<Self, Failure> {
        let mut params = Vec::new();
        for (i, (name, shape)) in SHAPES.iter().enumerate() {
            let n = shape.iter().product();
            let t = Tensor::from_vec(pattern(n, i + 1), *shape, device)?;
            params.push((*name, Var::from_tensor(&t)?));
        }
        Ok(Mlp { params })
    }

    fn param(&self, i: usize) -> &Tensor {
        self.params[i].1.as_tensor()
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = x
            .matmul(self.param(0))?
            .broadcast_add(self.param(1))?
            .relu()?;
        h.matmul(self.param(2))?.broadcast_add(self.param(3))
    }

    fn loss(&self, x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
        (self.forward(x)? - y)?.sqr()?.mean_all()
    }

    /// One SGD step: `p <- p - lr * grad`, with candle ops. Returns the loss before it.
    fn sgd_step(&self, x: &Tensor, y: &Tensor, lr: f64) -> Result<f32, Failure> {
        let loss = self.loss(x, y)?;
        let grads = loss.backward()?;
        for (name, var) in &self.params {
            let g = grads
                .get(var.as_tensor())
                .ok_or_else(|| Failure(format!("no gradient for {name}")))?;
            var.set(&(var.as_tensor() - (g * lr)?)?)?;
        }
        Ok(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?)
    }
}

fn batch(device: &Device) -> Result<(Tensor, Tensor), Failure> {
    Ok((
        Tensor::from_vec(pattern(4 * 3, 11), (4, 3), device)?,
        Tensor::from_vec(pattern(4 * 2, 12), (4, 2), device)?,
    ))
}

/// `a` and `b` are close: |a - b| <= atol + rtol * |b|, elementwise (compared as f32 on
/// the host).
fn close(what: &str, a: &Tensor, b: &Tensor, atol: f32, rtol: f32) -> Check {
    if a.dims() != b.dims() {
        return Err(Failure(format!(
            "{what}: shape {:?} != {:?}",
            a.dims(),
            b.dims()
        )));
    }
    let host = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
        t.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()
    };
    let (va, vb) = (host(a)?, host(b)?);
    for (i, (x, y)) in va.iter().zip(&vb).enumerate() {
        // NaN fails too.
        let ok = (x - y).abs() <= atol + rtol * y.abs();
        if !ok {
            return Err(Failure(format!("{what}: element {i}: {x} vs {y} (CPU)")));
        }
    }
    Ok(())
}

/// The tensor's bytes on the host (little-endian).
fn bytes(t: &Tensor) -> Result<Vec<u8>, Failure> {
    Ok(kiln_formats::candle::from_candle(t)?
        .into_data()
        .into_owned())
}

fn bit_equal(what: &str, a: &Tensor, b: &Tensor) -> Check {
    if a.dtype() != b.dtype() || a.dims() != b.dims() || bytes(a)? != bytes(b)? {
        return Err(Failure(format!("{what}: not bit-equal")));
    }
    Ok(())
}

fn on_device(s: &Selected, t: &Tensor, what: &str) -> Check {
    if !t.device().same_device(&s.device) {
        return Err(Failure(format!(
            "{what} is on {:?}, not on the selected {:?}",
            t.device().location(),
            s.device.location()
        )));
    }
    Ok(())
}

const ATOL: f32 = 1e-5;
const RTOL: f32 = 1e-4;

/// A forward pass on the device matches the CPU's.
pub fn forward(s: &Selected) -> Check {
    let (model, cpu) = (Mlp::new(&s.device)?, Mlp::new(&Device::Cpu)?);
    let ((x, _), (xc, _)) = (batch(&s.device)?, batch(&Device::Cpu)?);
    let y = model.forward(&x)?;
    on_device(s, &y, "the output")?;
    s.backend.synchronize(&s.device)?;
    close("forward", &y, &cpu.forward(&xc)?, ATOL, RTOL)
}

/// Every parameter gets a gradient on the device, equal to the CPU's within tolerance.
pub fn backward(s: &Selected) -> Check {
    let (model, cpu) = (Mlp::new(&s.device)?, Mlp::new(&Device::Cpu)?);
    let ((x, y), (xc, yc)) = (batch(&s.device)?, batch(&Device::Cpu)?);
    let grads = model.loss(&x, &y)?.backward()?;
    let cpu_grads = cpu.loss(&xc, &yc)?.backward()?;
    for (i, (name, var)) in model.params.iter().enumerate() {
        let g = grads
            .get(var.as_tensor())
            .ok_or_else(|| Failure(format!("no gradient for {name}")))?;
        on_device(s, g, name)?;
        let gc = cpu_grads
            .get(cpu.param(i))
            .ok_or_else(|| Failure(format!("no CPU gradient for {name}")))?;
        close(&format!("gradient of {name}"), g, gc, ATOL, RTOL)?;
    }
    Ok(())
}

/// SGD steps change the parameters as on the CPU, and the loss falls.
pub fn optimizer_step(s: &Selected) -> Check {
    let (model, cpu) = (Mlp::new(&s.device)?, Mlp::new(&Device::Cpu)?);
    let ((x, y), (xc, yc)) = (batch(&s.device)?, batch(&Device::Cpu)?);
    let before = bytes(model.param(0))?;
    let mut losses = Vec::new();
    for _ in 0..5 {
        losses.push(model.sgd_step(&x, &y, 0.1)?);
        cpu.sgd_step(&xc, &yc, 0.1)?;
    }
    if bytes(model.param(0))? == before {
        return Err(Failure("the step left fc1.weight unchanged".into()));
    }
    for (i, (name, _)) in model.params.iter().enumerate() {
        on_device(s, model.param(i), name)?;
        close(
            &format!("{name} after 5 steps"),
            model.param(i),
            cpu.param(i),
            ATOL,
            RTOL,
        )?;
    }
    let last = model.loss(&x, &y)?.to_scalar::<f32>()?;
    let fell = last < losses[0];
    if !fell {
        return Err(Failure(format!(
            "the loss did not fall: {losses:?} then {last}"
        )));
    }
    Ok(())
}

/// Parameters saved with `kiln_formats::safetensors::save` and loaded back onto the
/// device are bit-equal, and training resumes from them exactly.
pub fn checkpoint_roundtrip(s: &Selected) -> Check {
    let model = Mlp::new(&s.device)?;
    let (x, y) = batch(&s.device)?;
    model.sgd_step(&x, &y, 0.1)?;
    let map = kiln_formats::candle::map_from_candle(
        model.params.iter().map(|(n, v)| (*n, v.as_tensor())),
    )?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("model.safetensors");
    kiln_formats::safetensors::save(&path, &map)?;
    let loaded = kiln_formats::open(&path)?;
    let restored = Mlp::new(&s.device)?;
    for (name, var) in &restored.params {
        let t = kiln_formats::candle::to_candle(&loaded.tensor(name)?, &s.device)?;
        on_device(s, &t, name)?;
        var.set(&t)?;
    }
    for (i, (name, _)) in model.params.iter().enumerate() {
        bit_equal(
            &format!("{name} after the round trip"),
            restored.param(i),
            model.param(i),
        )?;
    }
    let (a, b) = (
        model.sgd_step(&x, &y, 0.1)?,
        restored.sgd_step(&x, &y, 0.1)?,
    );
    if a.to_bits() != b.to_bits() && s.backend.capabilities().deterministic {
        return Err(Failure(format!(
            "the loss after resuming differs: {a} vs {b}"
        )));
    }
    Ok(())
}

/// A host snapshot (what an asynchronous checkpoint takes; pinned where the backend
/// offers it) holds the parameters' exact bytes, and its buffer can be reused.
pub fn host_snapshot(s: &Selected) -> Check {
    let model = Mlp::new(&s.device)?;
    let tensors = || model.params.iter().map(|(n, v)| (*n, v.as_tensor()));
    let pinned = s.backend.capabilities().pinned_host_memory;
    let snap = HostSnapshot::take(s.backend, &s.device, tensors(), pinned, None)?;
    if snap.buffer().is_pinned() != pinned {
        return Err(Failure(format!(
            "asked for pinned memory = {pinned}, got pinned = {}",
            snap.buffer().is_pinned()
        )));
    }
    let check = |snap: &HostSnapshot| -> Check {
        for ((entry, data), (i, (name, _))) in snap.iter().zip(model.params.iter().enumerate()) {
            if entry.name != *name || entry.shape != model.param(i).dims() {
                return Err(Failure(format!(
                    "snapshot entry {} out of order",
                    entry.name
                )));
            }
            if data != bytes(model.param(i))?.as_slice() {
                return Err(Failure(format!("snapshot of {name}: bytes differ")));
            }
        }
        Ok(())
    };
    check(&snap)?;
    let again = HostSnapshot::take(
        s.backend,
        &s.device,
        tensors(),
        pinned,
        Some(snap.into_buffer()),
    )?;
    check(&again)
}

/// Every dtype the backend advertises computes a matmul close to f32's.
pub fn dtypes(s: &Selected) -> Check {
    let caps = s.backend.capabilities();
    if !caps.supports(DType::F32) {
        return Err(Failure(
            "f32 is not among the dtypes; kiln trains in f32".into(),
        ));
    }
    let a = Tensor::from_vec(pattern(16 * 16, 21), (16, 16), &s.device)?;
    let b = Tensor::from_vec(pattern(16 * 16, 22), (16, 16), &s.device)?;
    let reference = a.matmul(&b)?;
    for dtype in caps.dtypes {
        let tol = match dtype {
            DType::BF16 => 0.1,
            DType::F16 => 0.02,
            _ => 1e-4,
        };
        let c = a.to_dtype(dtype)?.matmul(&b.to_dtype(dtype)?)?;
        if c.dtype() != dtype {
            return Err(Failure(format!("{dtype:?} matmul gave {:?}", c.dtype())));
        }
        close(&format!("{dtype:?} matmul"), &c, &reference, tol, tol)?;
    }
    Ok(())
}

/// Two identical runs give bit-identical parameters and losses, when the backend says
/// it is deterministic (otherwise they must agree within tolerance).
pub fn deterministic(s: &Selected) -> Check {
    let train = || -> Result<(Vec<f32>, Mlp), Failure> {
        let model = Mlp::new(&s.device)?;
        let (x, y) = batch(&s.device)?;
        let losses = (0..3)
            .map(|_| model.sgd_step(&x, &y, 0.1))
            .collect::<Result<_, _>>()?;
        Ok((losses, model))
    };
    let ((la, a), (lb, b)) = (train()?, train()?);
    let exact = s.backend.capabilities().deterministic;
    for (i, (name, _)) in a.params.iter().enumerate() {
        if exact {
            bit_equal(&format!("{name} in a repeated run"), a.param(i), b.param(i))?;
        } else {
            close(
                &format!("{name} in a repeated run"),
                a.param(i),
                b.param(i),
                ATOL,
                RTOL,
            )?;
        }
    }
    if exact
        && la
            .iter()
            .map(|l| l.to_bits())
            .ne(lb.iter().map(|l| l.to_bits()))
    {
        return Err(Failure(format!(
            "losses differ between runs: {la:?} vs {lb:?}"
        )));
    }
    if !exact {
        println!(
            "{}: not deterministic by its own account; compared within tolerance",
            s.spec()
        );
    }
    Ok(())
}
