"""The compatibility layer: megatron-core's CUDA-bound pieces run on CPU with gloo, while project
and user code see real CPU-only torch; the megatron-core work-arounds still match the installed
release.

Everything that needs the layer runs in child processes (``tests.dist_utils`` or a subprocess),
so the pytest process itself is never patched.
"""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.limits import SHORT_TIMEOUT_S
from tests.tolerances import FLOAT32_REL, assert_close_scaled

TP = 2


# ---------------------------------------------------------------------------------------------
# Rank functions (module level so that they pickle)
# ---------------------------------------------------------------------------------------------


def _mappings():
    """Gather/scatter mappings of megatron-core: forward values and backward gradients."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    rank = ps.get_tensor_model_parallel_rank()
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(4, 2 * 3, generator=gen)  # same on every rank
    grad_full = torch.randn(4, 2 * 3, generator=gen)
    local = full[:, rank * 3:(rank + 1) * 3].clone().requires_grad_(True)

    out = {}
    # All-gather along the last dim; backward splits locally.
    gathered = tensor_parallel.gather_from_tensor_model_parallel_region(local)
    gathered.backward(grad_full)
    out["gather"], out["gather_grad"] = gathered.detach(), local.grad.clone()

    # Scatter (split) along the last dim; backward all-gathers.
    whole = full.clone().requires_grad_(True)
    scattered = tensor_parallel.scatter_to_tensor_model_parallel_region(whole)
    scattered.backward(grad_full[:, rank * 3:(rank + 1) * 3])
    out["scatter"], out["scatter_grad"] = scattered.detach(), whole.grad.clone()

    # Sequence-parallel all-gather along dim 0; its backward is a reduce-scatter that allocates
    # with torch.cuda.current_device() inside autograd (no TorchFunctionMode there).
    rows = full[rank * 2:(rank + 1) * 2].clone().requires_grad_(True)
    seq = tensor_parallel.gather_from_sequence_parallel_region(rows)
    seq.backward(grad_full)
    out["seq_gather"], out["seq_gather_grad"] = seq.detach(), rows.grad.clone()
    out["full"], out["grad_full"] = full, grad_full
    return out


def _reference_attention(q, k, v, causal):
    """Plain softmax attention on [s, b, n, h] tensors -> [s, b, n * h]."""
    s, b, n, h = q.shape
    scores = torch.einsum("qbnh,kbnh->bnqk", q, k) / math.sqrt(h)
    if causal:
        mask = torch.ones(s, s, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    context = torch.einsum("bnqk,kbnh->qbnh", scores.softmax(-1), v)
    return context.reshape(s, b, n * h)


def _dot_product_attention():
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    heads, head_dim, seq, batch = 4, 8, 5, 3
    config = TransformerConfig(
        num_layers=1,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        use_cpu_initialization=True,
        attention_dropout=0.0,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
    )
    rank = ps.get_tensor_model_parallel_rank()
    local_heads = slice(rank * heads // TP, (rank + 1) * heads // TP)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(seq, batch, heads, head_dim, generator=gen) for _ in range(3))
    grad_out = torch.randn(seq, batch, heads * head_dim // TP, generator=gen)

    results = {}
    for mask_type in (AttnMaskType.causal, AttnMaskType.no_mask):
        attention = DotProductAttention(
            config, layer_number=1, attn_mask_type=mask_type, attention_type="self"
        )
        local = [t[:, :, local_heads].clone().requires_grad_(True) for t in (q, k, v)]
        out = attention(*local, attention_mask=None)
        out.backward(grad_out)

        ref_in = [t[:, :, local_heads].clone().requires_grad_(True) for t in (q, k, v)]
        ref = _reference_attention(*ref_in, causal=mask_type == AttnMaskType.causal)
        ref.backward(grad_out)
        results[mask_type.name] = {
            "out": (out.detach(), ref.detach()),
            "grads": [(a.grad, b.grad) for a, b in zip(local, ref_in)],
        }
    return results


def _rng_tracker_and_recompute():
    """model_parallel_cuda_manual_seed, the TP RNG tracker and activation recompute."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(77)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        tp_draw = torch.rand(4)
    after_fork = torch.rand(4)
    torch.set_rng_state(before)
    no_fork = torch.rand(4)

    # Recompute: dropout inside the TP fork must replay identically in backward.
    weight = torch.linspace(-1.0, 1.0, 8)

    def block(x):
        with tracker.fork():
            return torch.nn.functional.dropout(x * weight, p=0.5, training=True).sin()

    x0 = torch.linspace(0.1, 0.8, 8)
    state = torch.get_rng_state(), tracker.get_states()
    x_plain = x0.clone().requires_grad_(True)
    y_plain = block(x_plain)
    y_plain.sum().backward()

    torch.set_rng_state(state[0])
    tracker.set_states(state[1])
    x_ckpt = x0.clone().requires_grad_(True)
    y_ckpt = tensor_parallel.checkpoint(block, False, x_ckpt)
    y_ckpt.sum().backward()
    return {
        "tp_draw": tp_draw,
        "after_fork": after_fork,
        "no_fork": no_fork,
        "y": (y_plain.detach(), y_ckpt.detach()),
        "grad": (x_plain.grad, x_ckpt.grad),
    }


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_gather_and_scatter_mappings_tp2():
    outs = run_distributed(_mappings, 2, tensor_model_parallel_size=TP)
    for rank, out in enumerate(outs):
        full, grad_full = out["full"], out["grad_full"]
        cols, rows = slice(rank * 3, (rank + 1) * 3), slice(rank * 2, (rank + 1) * 2)
        torch.testing.assert_close(out["gather"], full)
        torch.testing.assert_close(out["gather_grad"], grad_full[:, cols])
        torch.testing.assert_close(out["scatter"], full[:, cols])
        # Backward of the scatter gathers every rank's gradient slice.
        torch.testing.assert_close(out["scatter_grad"], grad_full)
        torch.testing.assert_close(out["seq_gather"], full)
        # Reduce-scatter: both ranks sent grad_full, so each row block is summed twice.
        torch.testing.assert_close(out["seq_gather_grad"], 2 * grad_full[rows])


def test_dot_product_attention_matches_softmax_attention_tp2():
    outs = run_distributed(_dot_product_attention, 2, tensor_model_parallel_size=TP)
    for out in outs:
        for mask_type, result in out.items():
            got, want = result["out"]
            # megatron's attention kernel vs explicit softmax attention: relative to the largest value.
            assert_close_scaled(got, want, FLOAT32_REL, f"forward, {mask_type}")
            for name, (got_grad, want_grad) in zip("qkv", result["grads"]):
                assert_close_scaled(got_grad, want_grad, FLOAT32_REL, f"d{name}, {mask_type}")


def test_model_parallel_seed_tracker_and_recompute_tp2():
    outs = run_distributed(_rng_tracker_and_recompute, 2, tensor_model_parallel_size=TP)
    # The TP stream differs between TP ranks; the default stream is the same on both.
    assert not torch.equal(outs[0]["tp_draw"], outs[1]["tp_draw"])
    torch.testing.assert_close(outs[0]["after_fork"], outs[1]["after_fork"])
    for out in outs:
        # fork() restores the default stream as if nothing had been drawn.
        torch.testing.assert_close(out["after_fork"], out["no_fork"])
        # Recompute replays the same dropout mask.
        torch.testing.assert_close(*out["y"])
        torch.testing.assert_close(*out["grad"])


# Code run as if it were one of megatron-core's modules (the layer tells callers apart by the
# calling module's name).
_MEGATRON_PROBE_SOURCE = textwrap.dedent(
    """
    import torch

    def device_cuda():
        return str(torch.zeros(1, device="cuda").device)

    def calls():
        x = torch.ones(2)
        torch.cuda.manual_seed(5)
        state = torch.cuda.get_rng_state()
        first = torch.rand(3)
        torch.cuda.default_generators[torch.cuda.current_device()].set_state(state)
        return {
            "devices": [str(torch.empty(1, device=d).device)
                        for d in ("cuda", "cuda:0", torch.device("cuda", 0), 0)],
            "cuda()": str(x.cuda().device),
            "types": [x.type(), x.bfloat16().type(), x.long().type(), str(x.type(torch.uint8).dtype)],
            "current_device": str(torch.cuda.current_device()),
            "rng_replay": torch.equal(first, torch.rand(3)),
            "rng_is_cpu_generator": torch.equal(torch.cuda.get_rng_state(), torch.get_rng_state()),
            "is_initialized": torch.cuda.is_initialized(),
            "synchronize": torch.cuda.synchronize(),
            "current_stream": torch.cuda.current_stream().wait_stream(torch.cuda.current_stream()),
        }
    """
)

# The same calls from user code before and after installation, then megatron-core's calls.
_REAL_TORCH_SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, torch

    def outcome(call):
        try:
            return ["returns", call()]
        except Exception as error:
            return ["raises", type(error).__name__, str(error)[:80]]

    USER_CALLS = {
        "zeros(2).type()": lambda: torch.zeros(2).type(),
        "bf16 type()": lambda: torch.zeros(2, dtype=torch.bfloat16).type(),
        "type(uint8)": lambda: torch.zeros(2).type(torch.uint8).type(),
        "device='cuda'": lambda: str(torch.zeros(2, device="cuda").device),
        "device='cuda:0'": lambda: str(torch.empty(1, device="cuda:0").device),
        "device=0": lambda: str(torch.empty(1, device=0).device),
        "to('cuda')": lambda: str(torch.ones(2).to("cuda").device),
        "cuda()": lambda: str(torch.ones(2).cuda().device),
        "pin_memory=True": lambda: torch.zeros(2, pin_memory=True).is_pinned(),
        "current_device()": lambda: str(torch.cuda.current_device()),
        "synchronize()": lambda: torch.cuda.synchronize(),
        "current_stream()": lambda: str(torch.cuda.current_stream()),
        "is_initialized()": lambda: torch.cuda.is_initialized(),
        "get_rng_state()": lambda: len(torch.cuda.get_rng_state()),
        "manual_seed(1)": lambda: torch.cuda.manual_seed(1),
        "default_generators[0]": lambda: str(torch.cuda.default_generators[0]),
    }
    megatron = {"__name__": "megatron.core.cpu_compat_probe"}
    exec(compile(sys.argv[1], "<megatron probe>", "exec"), megatron)

    before = {name: outcome(call) for name, call in USER_CALLS.items()}
    from megatron_dchag.compat.cpu import CudaToCpuMode, install_cpu_compat
    assert install_cpu_compat() and install_cpu_compat()  # idempotent
    after = {name: outcome(call) for name, call in USER_CALLS.items()}

    thread = {}
    def in_thread():
        thread["before_install"] = outcome(megatron["device_cuda"])
        install_cpu_compat()
        thread["after_install"] = outcome(megatron["device_cuda"])
    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join()

    print(json.dumps({
        "before": before,
        "after": after,
        "megatron": megatron["calls"](),
        "thread": thread,
        "modes": sum(isinstance(m, CudaToCpuMode)
                     for m in torch.overrides._get_current_function_mode_stack()),
    }))
    """
)


def _run_script(script, *args):
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=SHORT_TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_user_code_sees_real_torch_and_megatron_code_the_cpu():
    out = _run_script(_REAL_TORCH_SCRIPT, _MEGATRON_PROBE_SOURCE)
    # Project and user code: exactly what CPU-only torch does without the layer.
    assert out["after"] == out["before"]
    assert out["after"]["zeros(2).type()"] == ["returns", "torch.FloatTensor"]
    for call in ("device='cuda'", "cuda()", "current_device()", "get_rng_state()", "synchronize()",
                 "current_stream()"):
        assert out["after"][call][0] == "raises", call
    assert out["after"]["is_initialized()"] == ["returns", False]
    # megatron-core's code: the CPU.
    assert out["megatron"] == {
        "devices": ["cpu"] * 4,
        "cuda()": "cpu",
        "types": ["torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor", "torch.cuda.LongTensor",
                  "torch.uint8"],
        "current_device": "cpu",
        "rng_replay": True,
        "rng_is_cpu_generator": True,
        "is_initialized": True,
        "synchronize": None,
        "current_stream": None,
    }
    # The mode is thread-local: a thread runs megatron-core after installing the layer there.
    assert out["thread"]["before_install"][0] == "raises"
    assert out["thread"]["after_install"] == ["returns", "cpu"]
    assert out["modes"] == 1, "install_cpu_compat must be idempotent (one mode on the stack)"


_NO_OP_SCRIPT = textwrap.dedent(
    """
    import json, torch
    original = {name: getattr(torch.cuda, name)
                for name in ("current_device", "synchronize", "current_stream", "is_initialized", "get_rng_state",
                             "manual_seed", "default_generators")}
    torch.cuda.is_available = lambda: True   # pretend a GPU is present
    from megatron_dchag.compat.cpu import install_cpu_compat, is_cpu_compat_installed
    returned = install_cpu_compat()
    print(json.dumps({
        "returned": returned,
        "installed": is_cpu_compat_installed(),
        "untouched": all(getattr(torch.cuda, n) is f for n, f in original.items()),
        "modes": len(torch.overrides._get_current_function_mode_stack()),
        "type": torch.ones(1).type(),
    }))
    """
)


def test_install_is_a_no_op_when_a_gpu_is_available():
    result = _run_script(_NO_OP_SCRIPT)
    assert result == {
        "returned": False,
        "installed": False,
        "untouched": True,
        "modes": 0,
        "type": "torch.FloatTensor",
    }



def _train_tiny_transformer(use_distributed_optimizer):
    """Three steps of a 4-layer transformer through megatron's whole training stack.

    Pipeline schedule + p2p, DDP, get_megatron_optimizer (optionally distributed), full activation
    recompute (a forward inside backward) and dropout under the TP RNG tracker.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.enums import ModelType
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_block import TransformerBlock
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=4, hidden_size=16, num_attention_heads=4, use_cpu_initialization=True,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32, hidden_dropout=0.1, attention_dropout=0.1,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1,
    )

    class Stage(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.model_type = ModelType.encoder_or_decoder
            self.pre_process = ps.is_pipeline_first_stage()
            self.post_process = ps.is_pipeline_last_stage()
            self.share_embeddings_and_output_weights = False
            self.block = TransformerBlock(
                config, get_gpt_layer_local_spec(), pre_process=self.pre_process,
                post_process=self.post_process,
            )

        def set_input_tensor(self, tensor):
            self.block.set_input_tensor(tensor[0] if isinstance(tensor, list) else tensor)

        def forward(self, x):
            return self.block(x, attention_mask=None)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return self.block.sharded_state_dict(prefix + "block.", sharded_offsets, metadata)

    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=use_distributed_optimizer, grad_reduce_in_fp32=True
    )
    model = DistributedDataParallel(config, ddp_config, Stage())
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0,
                        use_distributed_optimizer=use_distributed_optimizer),
        [model],
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync

    gen = torch.Generator().manual_seed(100 + ps.get_data_parallel_rank())
    micro_batches = [torch.randn(6, 2, 16, generator=gen) for _ in range(4)]

    def forward_step(data_iterator, stage):
        x = next(data_iterator)
        output = stage(x if ps.is_pipeline_first_stage() else None)

        def loss_func(out):
            loss = (out.float() ** 2).mean()
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    losses, grad_norms = [], []
    for _ in range(3):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reported = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
            num_microbatches=len(micro_batches), seq_length=6, micro_batch_size=2,
            forward_only=False,
        )
        _, grad_norm, _ = optimizer.step()
        grad_norms.append(grad_norm)
        if reported:
            losses.append(torch.stack([r["loss"] for r in reported]).mean().item())
    return {"losses": losses, "grad_norms": grad_norms}


def test_training_stack_pp2_dp2_distributed_optimizer():
    kwargs = dict(pipeline_model_parallel_size=2)
    plain = run_distributed(_train_tiny_transformer, 4, False, **kwargs)
    sharded = run_distributed(_train_tiny_transformer, 4, True, **kwargs)
    for a, b in zip(plain, sharded):
        # The distributed optimizer must not change the numbers.
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
        assert a["grad_norms"] == pytest.approx(b["grad_norms"], rel=1e-5)
    last_stage = [out["losses"] for out in sharded if out["losses"]]
    assert len(last_stage) == 2 and all(len(l) == 3 for l in last_stage)
    assert all(l[-1] < l[0] for l in last_stage)  # it trains
    assert len({tuple(out["grad_norms"]) for out in sharded}) == 1  # one global grad norm


def _save_and_load(checkpoint_dir):
    """dist_checkpointing save (CUDA-bound without the layer) and load of a TP-sharded tensor."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedTensor

    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()

    def state(fill):
        shard = torch.full((2, 3), fill)
        return {"w": ShardedTensor.from_rank_offsets("w", shard, (0, rank, size), replica_id=0)}

    dist_checkpointing.save(state(float(rank + 1)), checkpoint_dir)
    with torch.no_grad():
        return dist_checkpointing.load(state(0.0), checkpoint_dir)["w"]


def test_dist_checkpointing_save_and_load_tp2(tmp_path):
    # The first save in a process takes ~2 s: megatron's writer reports through a spawned
    # multiprocessing manager that has to import torch.
    loaded = run_distributed(_save_and_load, 2, str(tmp_path), tensor_model_parallel_size=TP)
    for rank, shard in enumerate(loaded):
        torch.testing.assert_close(shard, torch.full((2, 3), float(rank + 1)))
    assert (tmp_path / "metadata.json").is_file()


# ---------------------------------------------------------------------------------------------
# megatron-core work-arounds (megatron_dchag.compat.megatron): each must still be needed on the
# installed megatron-core exactly where it applies.
# ---------------------------------------------------------------------------------------------


def _outcome(call):
    try:
        call()
        return None
    except Exception as error:  # noqa: BLE001 - the failure is the result
        return f"{type(error).__name__}: {error}"


def _torch_adam_checkpoint_round_trip(checkpoint_dir):
    """A distributed optimizer with torch's Adam: build the loading template of a fresh one, and
    load a fully_reshardable checkpoint, each without and with the work-arounds."""
    import inspect

    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_dchag.compat import megatron as compat

    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1,
                               use_cpu_initialization=True)
    metadata = {"distrib_optim_sharding_type": "fully_reshardable"}

    class Tiny(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(x)

    def build():
        torch.manual_seed(0)
        model = DistributedDataParallel(
            config, DistributedDataParallelConfig(use_distributed_optimizer=True), Tiny()
        )
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True), [model]
        )
        return model, optimizer

    def template(model, optimizer):
        return optimizer.sharded_state_dict(
            model.module.sharded_state_dict(), is_loading=True, metadata=metadata
        )

    def adam_state(optimizer):
        (opt,) = optimizer.chained_optimizers
        return [dict(opt.optimizer.state[p]) for g in opt.optimizer.param_groups for p in g["params"]]

    method = getattr(DistributedOptimizer, compat.SET_STATES_METHOD, None)
    out = {
        "version": ".".join(map(str, compat.MEGATRON_CORE_VERSION)),
        "fresh_state_applies": compat.MEGATRON_CORE_VERSION in compat.TORCH_ADAM_FRESH_STATE_VERSIONS,
        "step_load_applies": compat.MEGATRON_CORE_VERSION in compat.TORCH_ADAM_STEP_LOAD_VERSIONS,
        "set_states_parameters": None if method is None else list(inspect.signature(method).parameters),
    }

    # A fresh optimizer: megatron builds the template a checkpoint is loaded into.
    model, optimizer = build()
    out["fresh_template_without"] = _outcome(lambda: template(model, optimizer))
    model, optimizer = build()
    compat.initialize_torch_adam_state(optimizer)
    out["fresh_template_with"] = _outcome(lambda: template(model, optimizer))

    # One step, then a fully_reshardable checkpoint.
    model, saved = build()
    compat.initialize_torch_adam_state(saved)
    model.zero_grad_buffer()
    model(torch.linspace(-1.0, 1.0, 8).reshape(2, 4)).square().sum().backward()
    model.finish_grad_sync()
    saved.step()
    dist_checkpointing.save(
        saved.sharded_state_dict(model.module.sharded_state_dict(), metadata=metadata), checkpoint_dir
    )

    def load(patch):
        model, optimizer = build()
        compat._initialize_torch_adam_state(optimizer)  # the template needs it (see above)
        if patch:
            compat.patch_distributed_optimizer_for_torch_adam(optimizer)
        loaded = dist_checkpointing.load(template(model, optimizer), checkpoint_dir)
        optimizer.load_state_dict(loaded)
        return optimizer

    out["load_without"] = _outcome(lambda: load(patch=False))
    out["load_with"] = _outcome(lambda: load(patch=True))
    if out["load_with"] is None:
        restored, expected = adam_state(load(patch=True)), adam_state(saved)
        out["state_restored"] = len(restored) == len(expected) and all(
            r.keys() == e.keys() and all(torch.equal(r[k], e[k]) for k in e)
            for r, e in zip(restored, expected)
        )
    return out


def _needed_where_applied(applies, failure, version, name, constant):
    if applies and failure is None:
        return (f"megatron-core {version} no longer fails without {name}: end {constant} before "
                f"{version} or delete the work-around")
    if not applies and failure is not None:
        return f"megatron-core {version} still fails without {name} ({failure}): extend {constant}"
    return None


def test_torch_adam_work_arounds_are_needed_exactly_where_they_apply(tmp_path):
    (out,) = run_distributed(_torch_adam_checkpoint_round_trip, 1, str(tmp_path))
    version = out["version"]
    # The private method the step work-around wraps must keep its signature.
    assert out["set_states_parameters"] == ["self", "model_param", "tensors"], (
        f"megatron-core {version}: DistributedOptimizer._set_main_param_and_optimizer_states is "
        f"{out['set_states_parameters']}; revisit patch_distributed_optimizer_for_torch_adam"
    )
    for applies, failure, name, constant in (
        (out["fresh_state_applies"], out["fresh_template_without"], "initialize_torch_adam_state",
         "TORCH_ADAM_FRESH_STATE_VERSIONS"),
        (out["step_load_applies"], out["load_without"], "patch_distributed_optimizer_for_torch_adam",
         "TORCH_ADAM_STEP_LOAD_VERSIONS"),
    ):
        message = _needed_where_applied(applies, failure, version, name, constant)
        assert message is None, message
    if out["step_load_applies"]:
        # The failure the step work-around is for: the per-parameter 'step' left out of the load.
        assert out["load_without"].startswith("KeyError") and "step" in out["load_without"]
    # With the work-arounds (where they apply) both succeed and the Adam state comes back exactly.
    assert out["fresh_template_with"] is None, out["fresh_template_with"]
    assert out["load_with"] is None, out["load_with"]
    assert out["state_restored"]


# ---------------------------------------------------------------------------------------------
# torch FSDP2 under megatron-core: the CPU mesh and the two megatron/torch work-arounds
# ---------------------------------------------------------------------------------------------


def _torch_fsdp2_pieces():
    """megatron-core's ``TorchFullyShardedDataParallel`` over 2 gloo ranks: the mesh it builds, what
    ``DeviceMesh.from_group(..., "cuda")`` does for other callers, ``finish_grad_sync`` as
    ``finalize_model_grads`` calls it, and ``DTensor.to_local()`` identities, each without and with
    the work-around."""
    from megatron.core import parallel_state
    from megatron.core.distributed import TorchFullyShardedDataParallel, TorchFullyShardedDataParallelConfig
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_config import TransformerConfig
    from torch.distributed.device_mesh import DeviceMesh

    from megatron_dchag.compat import megatron as compat

    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1, use_cpu_initialization=True)

    class Tiny(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(x)

    model = TorchFullyShardedDataParallel(config, TorchFullyShardedDataParallelConfig(), Tiny(),
                                          sub_modules_to_wrap=set())
    out = {
        "version": ".".join(map(str, compat.MEGATRON_CORE_VERSION)),
        "torch": ".".join(map(str, compat.TORCH_VERSION)),
        "mesh": model.device_mesh.device_type,
        "user_cuda_mesh": DeviceMesh.from_group(parallel_state.get_data_parallel_group(), "cuda").device_type,
        "finish_applies": compat.MEGATRON_CORE_VERSION in compat.TORCH_FSDP2_FINISH_GRAD_SYNC_VERSIONS,
        "to_local_applies": compat.TORCH_VERSION in compat.TORCH_PARAMETER_TO_LOCAL_VIEW_VERSIONS,
    }
    model(torch.ones(2, 4)).sum().backward()
    out["finish_without"] = _outcome(lambda: model.finish_grad_sync(force_all_reduce=False))
    compat.patch_torch_fsdp2_finish_grad_sync(model)
    out["finish_with"] = _outcome(lambda: model.finish_grad_sync(force_all_reduce=False))
    weight = model.module.linear.weight
    with torch.no_grad():  # as megatron-core's optimizer checkpointing calls it
        out["to_local_stable_without"] = weight.to_local() is weight.to_local()
        with compat.local_tensor_identity([weight]):
            out["to_local_stable_with"] = weight.to_local() is weight._local_tensor
        out["to_local_stable_after"] = weight.to_local() is weight.to_local()
    out["rows"] = tuple(weight._local_tensor.shape)
    return out


def test_torch_fsdp2_pieces_are_needed_exactly_where_they_apply():
    out = run_distributed(_torch_fsdp2_pieces, 2)[0]
    version, torch_version = out["version"], out["torch"]
    # megatron-core asks for a "cuda" mesh; on CPU it gets a CPU one, user code still gets torch's answer.
    assert out["mesh"] == "cpu" and out["rows"] == (2, 4)
    assert out["user_cuda_mesh"] == "cuda", "DeviceMesh.from_group(group, 'cuda') from user code must be torch's"
    message = _needed_where_applied(out["finish_applies"], out["finish_without"], version,
                                    "patch_torch_fsdp2_finish_grad_sync", "TORCH_FSDP2_FINISH_GRAD_SYNC_VERSIONS")
    assert message is None, message
    # torch's DTensor.to_local() of a Parameter: a new view per call exactly on the listed releases
    assert out["to_local_applies"] == (not out["to_local_stable_without"]), (
        f"torch {torch_version}: to_local() {'returns' if out['to_local_stable_without'] else 'no longer returns'} "
        "the same tensor each call; revise TORCH_PARAMETER_TO_LOCAL_VIEW_VERSIONS")
    if out["finish_applies"]:
        assert out["finish_without"].startswith("TypeError") and "force_all_reduce" in out["finish_without"]
    assert out["finish_with"] is None, out["finish_with"]
    assert out["to_local_stable_with"] and out["to_local_stable_after"] == out["to_local_stable_without"]
