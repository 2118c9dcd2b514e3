"""ModelBuilder's int4 and int8 builds with the float weights on disk while they are quantized.

ModelBuilder quantizes when it saves: it serializes the whole float model into one in-memory ModelProto
(each weight cast to the build's float type, float32 for CPU: 15 GB for Phi-3-mini) while the Hugging Face
model those weights are read from is still held, and hands that proto to ONNX Runtime's
MatMulNBitsQuantizer. Its host peak is the two together (26.7 GiB for Phi-3-mini for CPU, more than a
24 GiB machine has). Writing the float graph to a scratch file first, one tensor at a time, and pointing
the MatMul weights at that file lets the Hugging Face model go, and the quantizer then reads each of them
from disk as it quantizes it. The same bytes come out; the cost is the scratch file's size in disk space.

The references are absolute paths, which only the default quantizer's MatMul path reads (through onnx_ir);
onnx's own loader, which the `rtn` and `k_quant` algorithms and Gather quantization use, refuses a file
outside the model's folder. So weights any other node reads stay in memory (the embedding: a few hundred
MB), and rtn and k_quant builds quantize in memory as the builder does.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def float_weights_on_disk(scratch: Path) -> Iterator[list[str]]:
    """While it is open, ModelBuilder's quantized builds spill their MatMul weights to `scratch`, removed
    afterwards. It yields a list that gets a line for each build that could not spill (a full or read-only
    disk), which then quantizes in memory as the builder does. It patches the builder's class for the whole
    process, so its caller runs one build at a time (build_onnx_model's lock)."""
    import onnx_ir as ir
    from onnxruntime_genai.models import builder

    model_class = builder.Model  # the class the builder's own models derive from (imported as `builders`)
    save_model = model_class.save_model
    quantized = {ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT8, ir.DataType.UINT8}
    spilled: list[Path] = []
    not_spilled: list[str] = []

    def spilling_save_model(self, out_dir):
        prequantized_qdq = getattr(self, "quant_type", None) is not None and self.quant_attrs.get("use_qdq")
        default_algo = getattr(self, "quantization_algo", None) == "default"
        if getattr(self, "onnx_dtype", None) in quantized and default_algo and not prequantized_qdq:
            folder = scratch / f"{self.filename}.float"
            spilled.append(folder)
            try:
                _spill(self.model, folder)
            except OSError as error:
                shutil.rmtree(folder, ignore_errors=True)  # now, not at the end: the build's output needs the disk
                not_spilled.append(f"could not write the float weights to {folder} ({error.strerror or error}): "
                                   "quantized them in memory")  # fmt: skip
        return save_model(self, out_dir)

    model_class.save_model = spilling_save_model
    try:
        yield not_spilled
    finally:
        model_class.save_model = save_model
        for folder in spilled:
            shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            scratch.rmdir()  # a link to another disk stays, and so does anything else the folder holds


def _spill(model, folder: Path) -> None:
    """Write `model` to `folder` and swap each weight that only MatMuls read for a reference to the written
    file, by absolute path: the quantizer reads the references it is handed without knowing where the model
    lives. The graph is untouched until the file is whole."""
    import onnx_ir as ir

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data", size_threshold_bytes=0)
    written = ir.load(path).graph.initializers
    for name, value in model.graph.initializers.items():
        tensor = written[name].const_value
        readers = {node.op_type for node, _ in value.uses()}
        if readers == {"MatMul"} and isinstance(tensor, ir.ExternalTensor):
            value.const_value = ir.ExternalTensor(tensor.path, tensor.offset, tensor.length, tensor.dtype,
                                                  shape=tensor.shape, name=tensor.name)  # fmt: skip
    # The lazily cast weights swapped out were what held the Hugging Face model's tensors: they go with them.
