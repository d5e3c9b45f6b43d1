//! Exporting any [`Model`]'s parameters for `save_pretrained`: owned host copies
//! ([`ModelExport`]), or the backend's reusable host snapshot ([`HostWeights`]) that
//! checkpoints write in the background.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Var};
use kiln_backend::{Backend, HostBuffer, HostSnapshot};
use kiln_checkpoint::model::{self as ckpt, ModelSave, SaveOptions, SavedModel};
use kiln_formats::candle::{from_candle_dtype, map_from_candle};
use kiln_formats::{Format, TensorCollection, TensorInfo, TensorMap, TensorView};
use serde_json::Value;

use crate::model::Model;
use crate::{Error, Result};

/// What a model contributes to a model folder: the pieces of a
/// [`ModelSave`], owned.
#[derive(Debug)]
pub struct ModelExport {
    /// `config.json` (the model's [`Model::config`]).
    pub config: Value,
    /// `generation_config.json`, for generative models.
    pub generation_config: Option<Value>,
    /// The parameters, host copies, in [`Model::parameters`] order (tied copies left out).
    pub weights: TensorMap<'static>,
    /// The tied weights, (tied name, source name).
    pub tied: Vec<(String, String)>,
}

impl ModelExport {
    /// The [`ModelSave`] for [`kiln_checkpoint::model::save_pretrained`]; add tokenizer
    /// files or training arguments with its `with_*` methods.
    pub fn model_save(&self) -> ModelSave<'_> {
        let mut save = ModelSave::new(self.config.clone(), &self.weights);
        if let Some(g) = &self.generation_config {
            save = save.with_generation_config(g.clone());
        }
        for (t, s) in &self.tied {
            save = save.with_tied(t.clone(), s.clone());
        }
        save
    }
}

/// Copies a model's parameters to host memory with its config, generation config and
/// tied weights, ready to save.
pub fn export(model: &dyn Model) -> Result<ModelExport> {
    export_parameters(model, &model.parameters())
}

/// Like [`export`], with `params` standing for the model's parameters (same names, in
/// [`Model::parameters`] order): the trainer passes the f32 master weights of bf16/fp16
/// training here, so that what is saved is what the optimizer holds.
pub fn export_parameters(model: &dyn Model, params: &[(String, Var)]) -> Result<ModelExport> {
    let weights = map_from_candle(params.iter().map(|(n, v)| (n.as_str(), v.as_tensor())))?;
    Ok(ModelExport {
        config: model.config(),
        generation_config: model.generation_config(),
        weights,
        tied: model.tied_weights(),
    })
}

/// Parameters copied into one block of host memory through their device's backend
/// ([`Backend::alloc_host`], [`Backend::copy_to_host`]; page-locked where the backend
/// offers it, so that a GPU copies by DMA): the weights an asynchronous checkpoint hands
/// to its writer. It is a [`TensorCollection`] whose tensors have exactly the dtypes,
/// shapes and bytes [`export`] gives, so the files written from either are identical.
/// Its buffer goes back to the next snapshot with [`HostWeights::into_buffer`].
#[derive(Debug)]
pub struct HostWeights {
    snapshot: HostSnapshot,
    infos: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
}

impl HostWeights {
    /// Copies `params` (all on one device) with `backend`, into `reuse` when it is a
    /// buffer of an earlier snapshot of the same size and kind (no allocation then).
    pub fn take(
        backend: &dyn Backend,
        params: &[(String, Var)],
        reuse: Option<HostBuffer>,
    ) -> Result<Self> {
        let device = params
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(Device::Cpu);
        if let Some((name, _)) = params
            .iter()
            .find(|(_, v)| !v.device().same_device(&device))
        {
            return Err(Error::Config(format!(
                "parameter {name:?} is on another device than the first parameter; a model lives on one device"
            )));
        }
        let pinned = backend.capabilities().pinned_host_memory;
        let snapshot = HostSnapshot::take(
            backend,
            &device,
            params.iter().map(|(n, v)| (n.as_str(), v.as_tensor())),
            pinned,
            reuse,
        )?;
        let mut infos = Vec::with_capacity(params.len());
        let mut index = HashMap::with_capacity(params.len());
        for e in snapshot.entries() {
            if index.insert(e.name.clone(), infos.len()).is_some() {
                return Err(Error::Config(format!(
                    "duplicate parameter name {:?}",
                    e.name
                )));
            }
            infos.push(TensorInfo {
                name: e.name.clone(),
                dtype: from_candle_dtype(e.dtype)?,
                shape: e.shape.clone(),
            });
        }
        Ok(HostWeights {
            snapshot,
            infos,
            index,
            metadata: BTreeMap::new(),
        })
    }

    /// The host buffer (pinned or not).
    pub fn buffer(&self) -> &HostBuffer {
        self.snapshot.buffer()
    }

    /// The buffer, to reuse for the next snapshot.
    pub fn into_buffer(self) -> HostBuffer {
        self.snapshot.into_buffer()
    }
}

impl TensorCollection for HostWeights {
    fn format(&self) -> Option<Format> {
        None
    }

    fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    fn tensors(&self) -> &[TensorInfo] {
        &self.infos
    }

    fn tensor(&self, name: &str) -> kiln_formats::Result<TensorView<'_>> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| kiln_formats::Error::NotFound(name.to_string()))?;
        let info = &self.infos[i];
        let range = self.snapshot.entries()[i].range.clone();
        TensorView::new(
            info.dtype,
            info.shape.clone(),
            &self.snapshot.buffer().bytes()[range],
        )
    }

    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.infos[i])
    }
}

/// Saves a model as a folder that transformers' `from_pretrained` loads (see
/// [`kiln_checkpoint::model::save_pretrained`]).
pub fn save_pretrained(
    model: &dyn Model,
    dir: impl AsRef<Path>,
    options: &SaveOptions,
) -> Result<SavedModel> {
    let export = export(model)?;
    Ok(ckpt::save_pretrained(dir, &export.model_save(), options)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Tensor};

    fn params(scale: f64) -> Vec<(String, Var)> {
        let d = Device::Cpu;
        let t = |v: Vec<f32>, shape: &[usize]| {
            Var::from_tensor(
                &Tensor::from_vec(v, shape, &d)
                    .unwrap()
                    .affine(scale, 0.0)
                    .unwrap(),
            )
            .unwrap()
        };
        vec![
            (
                "b.weight".into(),
                t(vec![1.5, -2.25, 3.0e-7, 4.0, 5.0, 6.0], &[2, 3]),
            ),
            ("a.bias".into(), t(vec![0.1, f32::MIN_POSITIVE], &[2])),
            (
                "h.weight".into(),
                Var::from_tensor(
                    &Tensor::new(&[7.5f32, -1.0], &d)
                        .unwrap()
                        .to_dtype(DType::BF16)
                        .unwrap(),
                )
                .unwrap(),
            ),
        ]
    }

    fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn host_snapshot_writes_the_bytes_of_the_export_path_and_reuses_its_buffer() {
        let backend = kiln_backend::find("cpu").unwrap();
        let p = params(1.0);
        let snap = HostWeights::take(backend, &p, None).unwrap();
        let export = map_from_candle(p.iter().map(|(n, v)| (n.as_str(), v.as_tensor()))).unwrap();
        assert_eq!(snap.tensors(), export.tensors());
        for info in export.tensors() {
            assert_eq!(
                snap.tensor(&info.name).unwrap(),
                export.tensor(&info.name).unwrap()
            );
        }
        let config = serde_json::json!({"architectures": ["T"], "model_type": "t"});
        for safetensors in [true, false] {
            let options = SaveOptions {
                safetensors,
                ..SaveOptions::default()
            };
            let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            ckpt::save_pretrained(a.path(), &ModelSave::new(config.clone(), &export), &options)
                .unwrap();
            ckpt::save_pretrained(b.path(), &ModelSave::new(config.clone(), &snap), &options)
                .unwrap();
            assert_eq!(
                files(a.path()),
                files(b.path()),
                "safetensors={safetensors}"
            );
        }

        // The next snapshot reuses the buffer: no allocation, new values.
        let at = snap.buffer().bytes().as_ptr();
        let p2 = params(2.0);
        let again = HostWeights::take(backend, &p2, Some(snap.into_buffer())).unwrap();
        assert_eq!(again.buffer().bytes().as_ptr(), at);
        let export2 = map_from_candle(p2.iter().map(|(n, v)| (n.as_str(), v.as_tensor()))).unwrap();
        for info in export2.tensors() {
            assert_eq!(
                again.tensor(&info.name).unwrap(),
                export2.tensor(&info.name).unwrap()
            );
        }
        assert!(again.tensor("nope").is_err());
        // A buffer of another size is not used.
        let small = HostWeights::take(backend, &p2[..1], Some(again.into_buffer())).unwrap();
        assert_eq!(small.buffer().len(), 24);
    }
}
