"""ModelBuilder's int4 and int8 builds with the float weights on disk while they are quantized.

ModelBuilder quantizes when it saves: it serializes the whole float model into one in-memory ModelProto
(each weight cast to the build's float type, float32 for CPU: 15 GB for Phi-3-mini) while the Hugging Face
model those weights are read from is still held, and hands that proto to ONNX Runtime's
MatMulNBitsQuantizer. Its host peak is the two together (26.7 GiB for Phi-3-mini for CPU, more than a
24 GiB machine has). Writing the float graph to a scratch file first, one tensor at a time, and pointing
the graph's weights at that file lets the Hugging Face model go, and the quantizer then reads each weight
from disk as it quantizes it. The same bytes come out; the cost is the scratch file's size in disk space.

Only the builder's default quantizer (MLAS round-to-nearest) reads weights by such references; the `rtn` and
`k_quant` algorithms read them through onnx's loader, which refuses a file outside the model's folder, so
those builds quantize in memory as the builder does.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

# One build at a time patches the builder (and two at once would hold two models in memory anyway).
_BUILD_LOCK = threading.Lock()


@contextlib.contextmanager
def float_weights_on_disk(scratch: Path) -> Iterator[None]:
    """While it is open, ModelBuilder's quantized builds spill their float weights to `scratch`, which is
    removed afterwards. Builds that do not quantize (fp16, bf16, fp32) save as they always have."""
    import onnx_ir as ir
    from onnxruntime_genai.models import builder

    model_class = builder.Model  # the class the builder's own models derive from (imported as `builders`)
    save_model = model_class.save_model
    quantized = {ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT8, ir.DataType.UINT8}

    def spilling_save_model(self, out_dir):
        if getattr(self, "onnx_dtype", None) in quantized and getattr(self, "quantization_algo", None) == "default":
            _spill(self.model, scratch / f"{self.filename}.float")
        return save_model(self, out_dir)

    with _BUILD_LOCK:
        model_class.save_model = spilling_save_model
        try:
            yield
        finally:
            model_class.save_model = save_model
            shutil.rmtree(scratch, ignore_errors=True)


def _spill(model, folder: Path) -> None:
    """Write `model` to `folder` and swap each of its top-level weights for a reference to the written file,
    by absolute path: the quantizer reads the references it is handed without knowing where the model lives."""
    import onnx_ir as ir

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data", size_threshold_bytes=0)
    written = ir.load(path).graph.initializers
    for name, value in model.graph.initializers.items():
        tensor = written[name].const_value
        if isinstance(tensor, ir.ExternalTensor):
            value.const_value = ir.ExternalTensor(tensor.path, tensor.offset, tensor.length, tensor.dtype,
                                                  shape=tensor.shape, name=tensor.name)  # fmt: skip
    gc.collect()  # the lazily cast weights held the Hugging Face model's tensors
