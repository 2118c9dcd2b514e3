"""The adapter step: LoRA settings, layer names, batching, and real training (with resume) on a tiny llama."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from grove_helpers import LLAMA_MODULES, PHI3_MODULES, Recorder, dataset_artifact, model_artifact, step_files

from olive_grove.tasks import speed
from olive_grove.tasks.adapter_settings import LoRASettings, QLoRASettings, check_target_modules
from olive_grove.tasks.adapters import train_adapter
from olive_grove.tasks.collate import pad_collator
from olive_grove.tasks.errors import UserError
from olive_grove.tasks.models import linear_module_names
from olive_grove.tasks.speed import fast_training_args, gradients_outside_graphs


def test_lora_defaults():
    settings = LoRASettings.model_validate({"train_data_config": "d"})
    assert (settings.r, settings.alpha, settings.lora_dropout, settings.torch_dtype) == (64, 16, 0.05, "bfloat16")
    assert settings.target_modules is None  # peft's default for the architecture


def test_seed_prefers_data_seed():
    def seed(**args) -> int:
        return LoRASettings.model_validate({"train_data_config": "d", "training_args": args}).seed

    assert (seed(), seed(seed=3), seed(seed=3, data_seed=9)) == (42, 3, 9)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"output_dir": "x"}, "is set by olive-grove"),
        ({"report_to": "wandb"}, "is set by olive-grove"),
        ({"max_stepz": 3}, "is not a TrainingArguments field"),
    ],
)
def test_training_args_are_checked(args, message):
    with pytest.raises(ValueError, match=message):
        LoRASettings.model_validate({"train_data_config": "d", "training_args": args})


def test_qlora_quantization_settings():
    q = QLoRASettings.model_validate({"train_data_config": "d", "double_quant": True})
    assert (q.type, q.quant_type, q.double_quant, q.compute_dtype) == ("QLoRA", "nf4", True, "bfloat16")
    with pytest.raises(ValueError):
        QLoRASettings.model_validate({"train_data_config": "d", "quant_type": "int3"})


def test_linear_layer_names_of_each_arch(tiny_phi3: Path, tiny_llama: Path):
    phi3 = linear_module_names(str(tiny_phi3))
    llama = linear_module_names(str(tiny_llama))
    assert {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} <= phi3
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= llama
    assert "q_proj" not in phi3


def test_target_modules_are_checked_against_the_model(tiny_phi3: Path):
    names = linear_module_names(str(tiny_phi3))
    check_target_modules(LoRASettings(train_data_config="d", target_modules=PHI3_MODULES), names)
    with pytest.raises(UserError) as exc:
        check_target_modules(LoRASettings(train_data_config="d", target_modules=["q_projj"]), names)
    assert exc.value.line() == "target_modules.q_projj: is not a linear layer of this model (did you mean 'qkv_proj'?)"


def test_collator_pads_with_ignored_labels():
    collate = pad_collator(pad_id=3)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    same = collate([{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [7, 8], "labels": [7, 8]}])
    assert "attention_mask" not in same  # equal lengths, no mask column: none needed


def test_collator_keeps_packed_rows_apart():
    collate = pad_collator(pad_id=0)
    batch = collate(
        [
            {"input_ids": [1, 2, 3, 4], "labels": [-100, 2, -100, 4], "position_ids": [0, 1, 0, 1]},
            {"input_ids": [5, 6], "labels": [-100, 6], "position_ids": [0, 1]},
        ]
    )
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]
    assert batch["labels"].tolist()[1] == [-100, 6, -100, -100]


def test_micro_batch_keeps_the_effective_batch():
    settings = LoRASettings.model_validate(
        {
            "train_data_config": "d",
            "micro_batch_size": 4,
            "training_args": {"per_device_train_batch_size": 6, "gradient_accumulation_steps": 2},
        }
    )
    logged: list[str] = []
    args = fast_training_args(settings, model=None, max_len=64, log=logged.append)
    # 12 samples per optimizer step: 4 per pass, 3 passes.
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"]) == (4, 3)
    assert logged == ["micro-batch 4 x 3 accumulation steps (effective batch 12)"]
    odd = settings.model_copy(update={"micro_batch_size": 5})  # 5 does not divide 12: the next that does
    args = fast_training_args(odd, model=None, max_len=64, log=logged.append)
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"]) == (4, 3)


def test_auto_micro_batch_changes_nothing_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("on a GPU auto probes memory")
    settings = LoRASettings.model_validate({"train_data_config": "d"})
    assert fast_training_args(settings, model=None, max_len=64, log=print) == {}


def test_on_cuda_the_trainer_never_waits_for_the_gpu_unless_asked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the arguments only; nothing runs
    settings = LoRASettings(train_data_config="d", micro_batch_size=1)
    args = fast_training_args(settings, model=None, max_len=64, log=lambda _: None)
    assert args["logging_nan_inf_filter"] is False and args["accelerator_config"].non_blocking
    asked = settings.model_copy(update={"training_args": {"logging_nan_inf_filter": True, "accelerator_config": {}}})
    chosen = fast_training_args(asked, model=None, max_len=64, log=lambda _: None)
    assert "logging_nan_inf_filter" not in chosen and "accelerator_config" not in chosen


@pytest.fixture
def phi3_on_cuda(tiny_phi3: Path, monkeypatch):
    """The tiny Phi-3, with torch told it has CUDA: for the choices made before anything runs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_phi3), dtype=torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return model


def test_liger_keeps_only_the_loss_when_layers_compile(phi3_on_cuda, monkeypatch):
    monkeypatch.setattr(speed, "liger_available", lambda: True)
    settings = LoRASettings(train_data_config="d", micro_batch_size=1)

    def liger_config(settings, model):
        compiled = bool(speed.layers_to_compile(settings, model))
        args = fast_training_args(settings, model=model, max_len=64, log=lambda _: None, compiled_layers=compiled)
        assert args["use_liger_kernel"]
        return args.get("liger_kernel_config")

    assert liger_config(settings, phi3_on_cuda) == speed.LIGER_LOSS_ONLY
    assert liger_config(settings.model_copy(update={"compile_layers": False}), phi3_on_cuda) is None
    assert liger_config(settings, torch.nn.Linear(2, 2)) is None  # no decoder layers found: nothing compiles


def test_cuda_graphs_only_where_shapes_and_layers_stay_put(phi3_on_cuda, monkeypatch):
    settings = LoRASettings(train_data_config="d")

    def graphs(settings=settings, model=phi3_on_cuda, lengths=(2048,), evaluates=False) -> bool:
        return speed.replays_cuda_graphs(settings, speed.layers_to_compile(settings, model), set(lengths), evaluates)

    assert graphs()
    assert not graphs(lengths=(30, 2048))  # a graph per shape: packed or unpadded rows vary
    assert not graphs(evaluates=True)  # evaluation brings its own shapes
    assert not graphs(model=torch.nn.Linear(2, 2))
    assert not graphs(settings.model_copy(update={"cuda_graphs": False}))
    assert not graphs(settings.model_copy(update={"compile_layers": False}))
    assert not graphs(settings.model_copy(update={"training_args": {"gradient_checkpointing": True}}))
    assert not graphs(settings.model_copy(update={"training_args": {"torch_compile": True}}))
    two = speed.Placement(rank=0, local_rank=0, world_size=2)
    assert not speed.replays_cuda_graphs(settings, speed.layers_to_compile(settings, phi3_on_cuda), {2048}, False, two)


def test_adapter_gradients_live_outside_graph_memory():
    """Each optimizer step starts from zero gradients of the adapter's own; within a step they are kept."""
    adapter, frozen = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).requires_grad_(False)
    model = torch.nn.Sequential(adapter, frozen)
    callback = gradients_outside_graphs(model)
    callback.on_step_begin(None, None, None)
    assert torch.equal(adapter.weight.grad, torch.zeros(2, 2)) and frozen.weight.grad is None
    adapter.weight.grad += 1  # a micro-batch's backward pass adds in place
    accumulated = adapter.weight.grad
    callback.on_step_begin(None, None, None)
    assert adapter.weight.grad is accumulated and torch.equal(accumulated, torch.ones(2, 2))
    model.zero_grad()  # as the Trainer does after each optimizer step
    callback.on_step_begin(None, None, None)
    assert torch.equal(adapter.weight.grad, torch.zeros(2, 2))


@pytest.mark.parametrize(("arch", "modules"), [("tiny_phi3", PHI3_MODULES), ("tiny_llama", LLAMA_MODULES)])
def test_compiled_decoder_layers_train_like_eager_ones(arch: str, modules: list[str], request):
    """Every decoder layer compiles, and the loss and the adapter's gradients do not move."""
    from peft import get_peft_model
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    path: Path = request.getfixturevalue(arch)
    settings = LoRASettings(train_data_config="d", r=4, lora_dropout=0.0, target_modules=modules)
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))

    def loss_and_grads(compiled: bool):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        model = get_peft_model(base, settings.peft_config(settings.target_modules))
        for name, parameter in model.named_parameters():  # B starts at zero: make the adapter count
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1)
        if compiled:
            layers = speed.decoder_layers(model)
            assert len(layers) == base.config.num_hidden_layers
            speed.compile_layers(layers, cuda_graphs=False)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), [p.grad for p in model.parameters() if p.requires_grad]

    torch._dynamo.reset()
    counters.clear()
    eager_loss, eager_grads = loss_and_grads(compiled=False)
    assert counters["stats"]["unique_graphs"] == 0
    compiled_loss, compiled_grads = loss_and_grads(compiled=True)
    assert counters["stats"]["unique_graphs"] > 0, "the layers ran compiled"
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    for eager, compiled in zip(eager_grads, compiled_grads, strict=True):
        assert eager.abs().sum() > 0
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


def _lora_b_after_training(model_dir: Path, rows: int, out: Path, device: int | None = None, **settings) -> tuple:
    """Train a rank-4 LoRA on the tiny Phi-3 through the step's own trainer (4 samples per optimizer step);
    the trainer's arguments and its lora_B weights after training."""
    import datasets
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from olive_grove.tasks.adapters import make_trainer

    ids = [[(7 * i + j) % 90 + 3 for j in range(32)] for i in range(rows)]
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    placed = {"device_map": {"": device}} if device is not None else {}
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **placed)
    training_args = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4, "learning_rate": 1e-2,
                     "save_strategy": "no", "seed": 0, **settings.pop("training_args")}  # fmt: skip
    lora = LoRASettings(train_data_config="d", r=4, lora_dropout=0.0, target_modules=PHI3_MODULES,
                        training_args=training_args, **settings)  # fmt: skip
    peft_model = get_peft_model(base, lora.peft_config(lora.target_modules))
    trainer = make_trainer(lora, peft_model, 0, data, None, out, speed.Placement(), Recorder())
    trainer.train()
    return trainer.args, {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}


def test_lean_memory_trains_the_same_adapter(tiny_phi3: Path, tmp_path: Path):
    """gradient_checkpointing (the lean-memory setting: each layer recomputed in the backward pass), with the
    whole effective batch in one pass, trains the adapter that the plain step with micro-batches does."""

    def adapter_after_training(lean: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        settings = {"micro_batch_size": 4 if lean else 1,
                    "training_args": {"max_steps": 3, "gradient_checkpointing": lean}}  # fmt: skip
        args, weights = _lora_b_after_training(tiny_phi3, 16, tmp_path / str(lean), **settings)
        assert args.gradient_checkpointing == lean
        return weights

    lean, plain = adapter_after_training(True), adapter_after_training(False)
    for name, weight in plain.items():
        assert weight.abs().sum() > 0
        torch.testing.assert_close(lean[name], weight, rtol=1e-4, atol=1e-5)


def test_offloaded_checkpoints_give_the_same_gradients(tiny_phi3: Path):
    """offload_checkpoints: what checkpointing keeps of each layer waits in other memory (here other CPU memory,
    on a GPU pinned host memory), and the adapter's gradients are those of checkpointing alone."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))

    def gradients(offloaded: bool) -> tuple[list[torch.Tensor], int]:
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(str(tiny_phi3), dtype=torch.float32)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(base, LoRASettings(train_data_config="d", r=4, lora_dropout=0.0,
                                                  target_modules=PHI3_MODULES).peft_config(PHI3_MODULES))  # fmt: skip
        for name, parameter in model.named_parameters():  # B starts at zero: make the adapter count
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1)
        model.train()
        moved, copy = [], torch.Tensor.copy_

        def counted_copy(tensor, source, **kwargs):  # the copies into other memory, seen
            moved.append(source)
            return copy(tensor, source, **kwargs)

        if offloaded:
            speed.offload_saved_tensors(model, device_type="cpu", smallest=0)
        with patch.object(torch.Tensor, "copy_", counted_copy):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        assert not any(t.untyped_storage().data_ptr() in weights for t in moved), "weights stay where they are"
        return [p.grad for p in model.parameters() if p.requires_grad], len(moved)

    offloaded, moved = gradients(offloaded=True)
    kept, not_moved = gradients(offloaded=False)
    assert moved - not_moved >= 2, "each checkpointed layer's input was moved"
    for a, b in zip(offloaded, kept):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_train_the_same_adapter(tiny_phi3: Path, tmp_path: Path):
    """Over optimizer steps of several micro-batches each, graph replays accumulate what eager passes do."""

    def adapter_after_training(cuda_graphs: bool) -> dict[str, torch.Tensor]:
        torch._dynamo.reset()
        torch.manual_seed(0)  # the adapter's lora_A starts from the same random values in both runs
        return _lora_b_after_training(tiny_phi3, 24, tmp_path / str(cuda_graphs), device=0, cuda_graphs=cuda_graphs,
                                      micro_batch_size=1, fused_kernels=False,
                                      training_args={"max_steps": 4})[1]  # fmt: skip

    replayed, compiled = adapter_after_training(True), adapter_after_training(False)
    for name, weight in compiled.items():
        assert weight.abs().sum() > 0
        torch.testing.assert_close(replayed[name], weight, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ real training


def test_trained_adapter_is_a_peft_adapter(llama_adapter, tiny_llama: Path):
    adapter: Path = llama_adapter["adapter"]
    assert (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["target_modules"]) == set(LLAMA_MODULES)
    assert Path(config["base_model_name_or_path"]) == tiny_llama
    assert (adapter / "tokenizer.json").is_file()  # infer and merge read the tokenizer from here


def test_training_metrics(llama_adapter):
    info = llama_adapter["info"]
    assert info.steps == 2
    assert [p.step for p in info.loss_curve] == [1, 2]
    assert all(p.loss > 0 for p in info.loss_curve)
    assert info.train_loss > 0 and info.eval_loss > 0
    # r * (in + out) per adapted layer: q_proj and v_proj are 64 -> 64, in each of 2 layers.
    assert info.trainable_params == 4 * (64 + 64) * 2 * 2
    assert info.resumed_from is None
    updates = llama_adapter["report"].updates
    assert [(u.step, u.total) for u in updates] == [(1, 2), (2, 2)]
    assert updates[-1].loss == info.loss_curve[-1].loss and updates[-1].seconds_left == 0
    assert sorted(p.name for p in llama_adapter["checkpoints"].iterdir()) == ["checkpoint-1", "checkpoint-2"]


def test_logged_losses_name_the_step_they_were_measured_at(llama_adapter):
    """The run log and the report's loss curve agree on which step had which loss."""
    info, lines = llama_adapter["info"], llama_adapter["report"].lines
    for point in info.loss_curve:
        assert any(line.startswith(f"step {point.step}/2, loss {point.loss:.4f}") for line in lines), lines


def test_the_adapter_keeps_its_eval_samples_for_the_merge(llama_adapter, llama_dataset):
    import datasets

    info, adapter = llama_adapter["info"], llama_adapter["adapter"]
    kept = datasets.load_from_disk(str(adapter / info.eval_samples))
    assert kept["input_ids"] == datasets.load_from_disk(str(llama_dataset / "eval"))["input_ids"]


def test_training_resumes_from_the_newest_checkpoint(llama_adapter, llama_dataset, tiny_llama: Path, tmp_path):
    files = step_files(tmp_path)
    shutil.copytree(llama_adapter["checkpoints"], files.work / "checkpoints")
    settings = llama_adapter["settings"]
    longer = settings.model_copy(update={"training_args": {**settings.training_args, "max_steps": 3}})
    report = Recorder()
    info = train_adapter(longer, files, report, model=model_artifact(tiny_llama),
                         dataset=dataset_artifact(llama_dataset))  # fmt: skip
    assert "resuming training from checkpoint-2" in report.lines
    assert info.resumed_from == "checkpoint-2"
    assert info.steps == 3
    assert (files.out / "adapter_model.safetensors").is_file()
