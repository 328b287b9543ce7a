"""The one TensorRT engine runner: run a serialized engine with torch CUDA tensors as its buffers (TensorRT 10 API).

Per call: `set_input_shape` for every input, `set_tensor_address` to each torch tensor's `data_ptr()` (inputs
made contiguous on the GPU in the engine's dtype; outputs allocated as torch tensors of the shape the context
reports), then `execute_async_v3` on the current torch CUDA stream, so the outputs are ordered with later torch
work on that stream without a host sync. Inputs TensorRT treats as shape tensors (`is_shape_inference_io`)
live in host memory. `tensorrt` and CUDA are imported lazily; constructing an engine without them raises
MissingExtraError / DeviceError.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Mapping, Optional, Union

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

    def __init__(self, path: Union[str, Path], device: str = "cuda",
                 plugins: Optional[Callable[[], None]] = None):
        self.trt = trt = require("tensorrt", "trt", "running TensorRT engines")
        import torch

        if not torch.cuda.is_available():
            raise DeviceError("the tensorrt backend needs a CUDA GPU; none is visible to torch")
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"TensorRT engine {self.path} is missing")
        if plugins is not None:  # JIT plugin implementations (e.g. register_plugins) register before deserializing
            plugins()
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
