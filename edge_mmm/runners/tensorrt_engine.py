"""Run a serialized TensorRT engine with torch CUDA tensors as its buffers (TensorRT 10 API).

Per call: `set_input_shape` for every input, `set_tensor_address` to each torch tensor's `data_ptr()` (inputs
made contiguous on the GPU in the engine's dtype; outputs allocated as torch tensors of the shape the context
reports), then `execute_async_v3` on the current torch CUDA stream, so the outputs are ordered with later torch
work on that stream without a host sync. Inputs TensorRT treats as shape tensors (`is_shape_inference_io`)
live in host memory. `tensorrt` and CUDA are imported lazily; constructing an engine without them raises
MissingExtraError / DeviceError.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, Mapping, Optional, Union

from edge_mmm.errors import DeviceError, InputError, ModelFileError, require

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _torch_dtype(trt, dt):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int8: torch.int8, trt.bool: torch.bool, trt.uint8: torch.uint8}
    for name, tdt in (("bfloat16", torch.bfloat16), ("int64", torch.int64)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = tdt
    if dt not in table:
        raise ModelFileError(f"engine tensor dtype {dt} has no torch equivalent")
    return table[dt]


class TensorRTEngine:
    """A deserialized engine + one execution context. `engine(feeds)` -> {output name: torch CUDA tensor}."""

    def __init__(self, path: Union[str, Path], device: str = "cuda", plugins: bool = False):
        self.trt = trt = require("tensorrt", "trt", "running TensorRT engines")
        import torch

        if not torch.cuda.is_available():
            raise DeviceError("the tensorrt backend needs a CUDA GPU; none is visible to torch")
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"TensorRT engine {self.path} is missing")
        if plugins:  # JIT plugin implementations must be registered before deserializing
            from edge_mmm.exporters.tensorrt_plugins import register_plugins

            register_plugins()
        self.device = torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ModelFileError(f"{self.path}: TensorRT could not deserialize the engine (built for another GPU "
                                 "or TensorRT version? rebuild it)")
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            (self.inputs if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs).append(name)
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in self.inputs + self.outputs}
        self.host_inputs = {n for n in self.inputs if self.engine.is_shape_inference_io(n)}

    def __call__(self, feeds: Mapping[str, "torch.Tensor"]) -> Dict[str, "torch.Tensor"]:
        import torch

        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise InputError(f"{self.path.name}: missing engine input(s) {', '.join(missing)}")
        keep = []  # the buffers must outlive the enqueue
        for name in self.inputs:
            dev = torch.device("cpu") if name in self.host_inputs else self.device
            t = torch.as_tensor(feeds[name]).to(device=dev, dtype=self.dtypes[name]).contiguous()
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise InputError(f"{self.path.name}: input {name} shape {tuple(t.shape)} is outside the engine's "
                                 "optimization profile")
            self.context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ModelFileError(f"{self.path.name}: output {name} has a data-dependent shape {shape}")
            out = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outs[name] = out
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise DeviceError(f"{self.path.name}: TensorRT execution failed")
        if self.host_inputs:  # host shape buffers must stay valid until TensorRT has read them
            stream.synchronize()
        del keep
        return outs


class TensorRTWhisperBackend:
    """The Whisper backend interface (edge_mmm.asr.backends) on two engines: encoder (mel -> cross K/V of every
    decoder layer) and decoder (tokens + self/cross K/V -> logits + extended self K/V), both built from our
    standard-op ONNX export (exporters/onnx_whisper.py, ort_fused_attention=False). K/V stay on the GPU."""

    name = "tensorrt"

    def __init__(self, encoder_engine: Union[str, Path], decoder_engine: Union[str, Path], config,
                 device: str = "cuda"):
        import torch

        self.config = config
        self.encoder = TensorRTEngine(encoder_engine, device)
        self.decoder = TensorRTEngine(decoder_engine, device)
        self.device = torch.device(device)

    def encode(self, mel):
        import torch

        from edge_mmm.exporters.onnx_whisper import cross_names

        out = self.encoder({"mel": torch.as_tensor(mel, dtype=torch.float32)})
        k_names, v_names = cross_names(self.config.n_text_layer)
        return [out[n] for n in k_names], [out[n] for n in v_names]

    def new_state(self, audio, group: int):
        import torch

        from edge_mmm.asr.backends import DecoderState

        ck, cv = audio
        if group > 1:
            ck = [k.repeat_interleave(group, 0) for k in ck]
            cv = [v.repeat_interleave(group, 0) for v in cv]
        cfg = self.config
        empty = torch.zeros((cfg.n_text_layer, ck[0].shape[0], 0, cfg.n_text_state), device=self.device)
        return DecoderState(ck, cv, empty, empty.clone())

    def step(self, state, tokens):
        import numpy as np
        import torch

        from edge_mmm.exporters.onnx_whisper import cross_names

        k_names, v_names = cross_names(self.config.n_text_layer)
        feeds = {"tokens": torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)),
                 "offset": torch.tensor(state.offset, dtype=torch.int64), "self_k": state.self_k,
                 "self_v": state.self_v, **dict(zip(k_names, state.cross_k)), **dict(zip(v_names, state.cross_v))}
        out = self.decoder(feeds)
        state.self_k, state.self_v = out["new_self_k"], out["new_self_v"]
        state.offset += tokens.shape[1]
        return out["logits"].float().cpu().numpy()

    def reorder(self, state, order) -> None:
        import torch

        idx = torch.as_tensor(order, device=self.device)
        state.self_k, state.self_v = state.self_k[:, idx], state.self_v[:, idx]


class TensorRTVisionEncoder:
    """The vision backend interface (edge_mmm.vision.backends) on an engine built from our vision ONNX."""

    name = "tensorrt"

    def __init__(self, engine: Union[str, Path], patch_size: int, device: str = "cuda", max_tiles: Optional[int] = None):
        self.engine = TensorRTEngine(engine, device)
        self.path = Path(engine)
        self.patch_size = patch_size
        self.max_tiles = max_tiles  # the profile's vision_batch: larger images run in chunks
        self.calls = 0

    def __call__(self, pixel_values, patch_mask):
        import torch

        step = self.max_tiles or pixel_values.shape[0]
        parts = [self.engine({"pixel_values": pixel_values[i:i + step].float(),
                              "patch_mask": patch_mask[i:i + step].bool()})["image_features"]
                 for i in range(0, pixel_values.shape[0], step)]
        return torch.cat(parts).float().cpu()

    def encode(self, pixel_values, pixel_attention_mask=None):
        from edge_mmm.models.idefics3 import real_tiles

        self.calls += 1
        pv, mask = real_tiles(pixel_values.float(), pixel_attention_mask, self.patch_size)
        feats = self(pv, mask)
        return feats.reshape(-1, feats.shape[-1])
