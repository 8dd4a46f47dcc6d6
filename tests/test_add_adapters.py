"""peftkern.add_adapters on tiny transformers models: training parity with the reference path, placements,
save / load of the adapter weights alone, and AdapterHub checkpoints."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import (
    DEVICE,
    HAS_CUDA,
    INTERPRET,
    MODEL_TOLERANCE,
    TOLERANCE,
    assert_close,
    assert_close_or_as_exact,
    record_margin,
    run_seed,
)
from test_fuse import batch, tiny_bert, tiny_gpt2, tiny_llama, tiny_mistral

import peftkern
from peftkern import reference
from peftkern.integrations.adapters import PRESETS, _adapter_of, adapter_state_dict, adapters, transformer_layers

transformers = pytest.importorskip("transformers")
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
FAST = "triton" if (HAS_CUDA or INTERPRET) else None
# Adam's first steps move every weight by ~lr whatever the gradient's size: later steps amplify rounding.
GRAD_SCALE = MODEL_TOLERANCE[DTYPE] / TOLERANCE[DTYPE] if HAS_CUDA else 2.0
SCALAR_SCALE = 10.0


def tiny_qwen2():
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return transformers.Qwen2ForCausalLM(cfg)


FACTORIES = {"llama": tiny_llama, "mistral": tiny_mistral, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2, "bert": tiny_bert}
CASES = [("llama", "houlsby"), ("llama", "parallel"), ("mistral", "pfeiffer"), ("qwen2", "pfeiffer"),
         ("gpt2", "houlsby"), ("gpt2", "parallel"), ("bert", "houlsby"), ("bert", "parallel")]


def build(name, preset, **overrides):
    torch.manual_seed(run_seed(0))
    model = FACTORIES[name]().to(DEVICE, DTYPE)
    names = peftkern.add_adapters(model, peftkern.AdapterConfig(**{**peftkern.integrations.adapters.PRESETS[preset],
                                                                   "reduction_factor": 8, **overrides}))
    with torch.no_grad():  # move off the near-identity init so that the adapters matter
        for n, p in model.named_parameters():
            if ".bottleneck_adapters." in n and p.dim() > 0 and "layer_norm" not in n:
                p.normal_(0, 0.1)
                if n.endswith(".down.bias"):
                    # a tiny model's block outputs are small (|h| < 0.35), so a ReLU unit lives where its bias is
                    # positive: with 8 units of N(0, 0.1) biases all eight were dead now and then, and a layer's down
                    # and up weights got zero gradients (qwen2-pfeiffer, seed 1255395745, the H100, 2026-12-05)
                    p.abs_()
    return model, names


def draw_adapters(model, std):
    """Every adapter parameter of `model` drawn from N(0, std^2), so that the adapters matter."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".bottleneck_adapters." in n:
                p.normal_(0, std)


def batch_for(name, seed):
    return batch("bert" if name == "bert" else "llama", seed=seed)


def train_steps(model, name, backend, steps=3):
    peftkern.set_backend(backend)
    try:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        history = []
        for step in range(steps):
            opt.zero_grad()
            out = model(**batch_for(name, step))
            out.loss.backward()
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            history.append((out.logits.detach().clone(), grads))
            opt.step()
        return history
    finally:
        peftkern.set_backend(None)


# ReLU's kink in a bf16 model: from the second adapter on, the fused and the reference paths see inputs that differ
# by bf16 rounding, so a pre-activation near 0 can land on either side of the kink in either path (or in the float64
# replica), and that token's whole row of dz is in one path and not in the other. On the CPU, bf16 emulations of
# gpt2-parallel (30 seeds x 3 steps) put the down weights' gradients up to 0.28 off float64, the reference path's as
# often as the kernels' (up to 42x apart); with SiLU, at most 1.3x apart. On the GPU the kernels' was 0.117 off
# against the reference path's 6.2e-3 (gpt2-parallel, seed 58364916, the H100, 2026-12-06). As clear_relu_kinks in
# test_adapter.py says, which side is right is not the op's to know: for every pre-activation within this share of
# the norm of its terms (|h * Wd_j|, and bd_j) of 0 the replicas take the side that the fused path's own input gives
# (z summed in float32 from the h the fused op received, as the kernels sum it), and their own elsewhere. The side
# is not read off the op, so a kernel that misplaces the kink still fails. With the sides shared, the emulations
# above came within 1.6x of each other, at most 1.3e-2 off float64.
KINK_SHARE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


class KinkSides:
    """The side of ReLU's kink that the fused path took for each pre-activation, adapter call by call in the order
    of the forward pass (ReLU adapters without LN, as in every ReLU case here): recorded from the fast model's
    calls, taken in the same order by each replica's."""

    def __init__(self):
        self.sides, self.taken = [], 0

    @staticmethod
    def applies(activation, layer_norm):
        from peftkern.ops import adapter as op

        return op.ACTIVATION_ALIASES[activation.lower()] == "relu" and not op._layer_norm_args(layer_norm)[0]

    def record(self, h, down_weight, down_bias):
        # z as the kernels make it: products of the same 16-bit h and Wd summed in float32 (orders of summation
        # part by float32 rounding, far inside KINK_SHARE)
        with torch.no_grad():
            z = torch.nn.functional.linear(h.float(), down_weight.float(),
                                           None if down_bias is None else down_bias.float())
        self.sides.append(z > 0)

    def take(self):
        side = self.sides[self.taken]
        self.taken += 1
        return side


def _autograd_adapter(h, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual=None,
                      layer_norm=None, side=None):
    """peftkern.bottleneck_adapter's arguments, computed by reference.bottleneck_adapter under torch's autograd: no
    code of the op's autograd.Function or backends (the torch backend runs reference.py's hand-written backward
    through the same Function, so a defect there was on both sides; a test audit, 2026-12-05). With `side` (a ReLU
    adapter without LN; KinkSides), ReLU takes that side of the kink for the pre-activations within KINK_SHARE of
    it: z * keep, in the reference's compute dtype, with the same scaling and residual."""
    from peftkern.ops import adapter as op

    scaling_f, scale = op._scaling_args(scaling)
    use_ln, ln_weight, ln_bias, ln_eps = op._layer_norm_args(layer_norm)
    if side is None:
        return reference.bottleneck_adapter(h, down_weight, down_bias, up_weight, up_bias,
                                            op.ACTIVATION_ALIASES[activation.lower()], scaling_f, scale, residual,
                                            ln_weight, ln_bias, use_ln, ln_eps)
    dt = reference.compute_dtype(h)
    x, wd = h.to(dt), down_weight.to(dt)
    z = torch.nn.functional.linear(x, wd, None if down_bias is None else down_bias.to(dt))
    with torch.no_grad():
        size = (x * x) @ (wd * wd).t()
        if down_bias is not None:
            size = size + down_bias.to(dt) ** 2
        keep = torch.where(z.abs() < KINK_SHARE[DTYPE] * size.sqrt(), side, z > 0).to(dt)
    u = torch.nn.functional.linear(z * keep, up_weight.to(dt), None if up_bias is None else up_bias.to(dt))
    r = h if residual is None else residual
    return (r.to(dt) + reference._adapter_scale(scaling_f, scale, dt) * u).to(h.dtype)


def _autograd_adapter_with_terms(terms, kinks=None):
    """_autograd_adapter that also adds up, into terms[id(scale)], the sum of |terms| of its learned scale's
    gradient: scaling * sum |g * u| over every token and feature (g the gradient of the output, u the adapter's
    output before the scale), the size against which that gradient's rounding is measured (terms None: nothing
    added). kinks: KinkSides to take each ReLU adapter's side from (one per call, for both of its computations), or
    None."""
    from peftkern.ops import adapter as op

    def adapter(h, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual=None, layer_norm=None):
        side = kinks.take() if kinks is not None and KinkSides.applies(activation, layer_norm) else None
        out = _autograd_adapter(h, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual,
                                layer_norm, side)
        if terms is not None and isinstance(scaling, torch.Tensor) and out.requires_grad:
            with torch.no_grad():  # residual 0, scale 1: u alone
                u = _autograd_adapter(h, down_weight, down_bias, up_weight, up_bias, activation, 1.0,
                                      torch.zeros_like(out), layer_norm, side)
            # the layer passes its (1,) Parameter as a 0-dim view: the key is the Parameter's id
            key = id(scaling if scaling._base is None else scaling._base)
            size = abs(op._scaling_args(scaling)[0])

            def add(g, key=key, size=size, u=u):
                terms[key] = terms.get(key, 0.0) + size * (g * u).abs().sum().item()

            out.register_hook(add)
        return out

    return adapter


def _recording(fused, kinks):
    """The fused op, recording into kinks (KinkSides) the side of the kink of each ReLU adapter's pre-activations."""

    def adapter(h, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual=None, layer_norm=None):
        if KinkSides.applies(activation, layer_norm):
            kinks.record(h, down_weight, down_bias)
        return fused(h, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual, layer_norm)

    return adapter


def output_head(model):
    """The linear layer that makes the logits: the language models' lm_head, BERT's classifier."""
    head = model.get_output_embeddings()
    return head if head is not None else model.classifier


def step_grads(model, name, backend, step, terms=None, kinks=None):
    """(logits, {name: grad}, head input) of one training step's forward and backward, gradients zeroed first: on
    `backend`, or with backend None through _autograd_adapter (recording each learned scale's sum of |terms| into
    `terms`, a dict by parameter name, when given). The head input is what output_head(model) multiplies. kinks
    (KinkSides): the fused path records the sides of ReLU's kink into it, a replica takes them from it."""
    import peftkern.nn.adapter as module

    fused = module.bottleneck_adapter
    by_id = {}
    if backend is None:
        if kinks is not None:
            kinks.taken = 0
        module.bottleneck_adapter = _autograd_adapter_with_terms(None if terms is None else by_id, kinks)
    elif kinks is not None:
        kinks.sides, kinks.taken = [], 0
        module.bottleneck_adapter = _recording(fused, kinks)
    peftkern.set_backend(backend)
    seen = []
    hook = output_head(model).register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    try:
        model.zero_grad(set_to_none=True)
        out = model(**batch_for(name, step))
        out.loss.backward()
        if terms is not None:
            terms.update({n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id})
        grads = {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach(), grads, seen[0]
    finally:
        hook.remove()
        peftkern.set_backend(None)
        module.bottleneck_adapter = fused


@pytest.mark.skipif(FAST is None, reason="needs a GPU or the Triton interpreter")
@pytest.mark.parametrize("name,preset", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_training_matches_the_reference_path(name, preset):
    """A model trained three AdamW steps with the fused kernels: at every step the reference path (reference.py's
    bottleneck_adapter under torch's autograd), on the same parameters, gives the same logits and adapter gradients.
    The reference replicas take the fused model's parameters at each step rather than training on their own: with lr
    1e-2 AdamW's first steps move each parameter by about lr times the sign of its gradient, so two trajectories
    part wherever a gradient element near zero has two signs, and a down-bias gradient at step 2 came out 0.0046
    against -0.0024 from parameters that had parted (llama-parallel, bf16, the GPU run of 2026-12-05)."""
    fast, _ = build(name, preset, layer_norm=preset == "houlsby", scaling="learned" if name == "gpt2" else
                    peftkern.integrations.adapters.PRESETS[preset].get("scaling", 1.0))
    slow, exact = copy.deepcopy(fast), copy.deepcopy(fast).double()  # exact: the arbiter (assert_close_or_as_exact)
    opt = torch.optim.AdamW([p for p in fast.parameters() if p.requires_grad], lr=1e-2)
    moved = set()  # the parameters that an optimizer step changed
    for step in range(3):
        for replica in (slow, exact):
            replica.load_state_dict(fast.state_dict())  # copy_ casts to exact's float64
        terms = {}
        kinks = KinkSides()
        (lf, gf, xf), (ls, gs, xs), (le, ge, xe) = (step_grads(m, name, b, step, t, kinks) for m, b, t in
                                                    ((fast, FAST, None), (slow, None, None), (exact, None, terms)))
        assert kinks.taken == len(kinks.sides), "each replica took every ReLU adapter's sides"
        assert bool(kinks.sides) == (PRESETS[preset]["non_linearity"] == "relu"), "the ReLU adapters' sides recorded"
        assert_close_or_as_exact(xf, xs, xe, DTYPE, f"step {step} the output head's input")
        try:
            assert_close_or_as_exact(lf, ls, le, DTYPE, f"step {step} logits")
        except AssertionError as differ:
            # BERT's classifier makes 2 x 3 logits from 64 features with weights of std 0.02, terms of both signs:
            # the logits are 5-9x smaller than the sum of |terms| (measured over six seeds on the CPU), and each
            # path's rounding of the head's input is relative to the terms. In bf16 on the GPU the kernels' step-1
            # logits were 3.1e-2 off float64 where the reference path's were 1.4e-2 (bert-houlsby, seed 897023637,
            # H100 and H200 alike, 2026-12-06; the logits' margins of the other cases 0.2-0.43 of the tolerance).
            # So past the check above the logits' error is measured against the head's sum of |terms|; the head's
            # input, checked above, still catches an adapter that computes a different function.
            head = output_head(exact)
            size = xe.abs() @ head.weight.abs().t().to(xe.dtype)
            if head.bias is not None:
                size = size + head.bias.abs().to(xe.dtype)
            err, bound = (lf.double() - le).norm().item(), TOLERANCE[DTYPE] * size.norm().item()
            record_margin(err / bound, f"step {step} logits against the head's sum of |terms|")
            if err > bound:
                raise AssertionError(f"{differ}; its error {err:.3e} is above {bound:.3e}, the tolerance times the "
                                     f"norm of the head's sum of |terms|") from None
        assert gf.keys() == gs.keys() and gf, "the same parameters get gradients"
        assert all(".bottleneck_adapters." in n or "embed" in n for n in gf)
        # the |terms| fallback below needs every learned scale's sum (a key by the 0-dim view's id found none)
        assert {n for n in gs if n.endswith(".scale")} <= terms.keys(), "each learned scale's sum of |terms|"
        for n in gs:
            # A learned scale's gradient is one number summed over every token and feature, terms of both signs: the
            # two paths' roundings are relative to the terms, not to the (much smaller) sum, as in test_adapter.py
            # (SCALAR_SCALE), in float32 too (the kernels' split sums against torch's cascade: 2.2e-5 against 2e-5
            # with seed 98902793). test_adapter's test_learned_scale_gradient_without_cancellation checks it tightly.
            # At most a tolerance of 0.5 though: on a GPU 0.02 x 5 x 10 = 1.0 passed a zeroed scale gradient (its
            # relative error is 1.0; a test audit, 2026-12-05).
            scalar = min(SCALAR_SCALE, 0.5 / (TOLERANCE[DTYPE] * GRAD_SCALE)) if n.endswith(".scale") else 1.0
            try:
                assert_close_or_as_exact(gf[n], gs[n], ge[n], DTYPE, f"step {step} grad {n}",
                                         scale=GRAD_SCALE * scalar)
            except AssertionError as differ:
                # Where the sum cancels by more than that, its error is measured against the sum of |terms|: in
                # bf16 on a GPU the float64 value was 4.6e-5, the reference path's 2.8e-5 and the kernels' -3.8e-6
                # (gpt2-houlsby, seed 129342843, 2026-12-05): each path's g comes through the model's bf16 layers,
                # rounded differently, and each term's rounding is relative to the term. The replicas share the
                # step's parameters, so no GRAD_SCALE for Adam's amplification; a zeroed scale gradient still fails
                # wherever the sum is more than the tolerance times its |terms| (checked by mutation in float32).
                if n not in terms:
                    raise
                err, bound = (gf[n].double() - ge[n]).abs().item(), TOLERANCE[DTYPE] * terms[n]
                record_margin(err / bound, f"step {step} grad {n} against its sum of |terms|")
                if err > bound:
                    raise AssertionError(f"{differ}; its error {err:.3e} is above {bound:.3e}, the tolerance times "
                                         f"its sum of |terms| {terms[n]:.3e}") from None
        before = {n: p.detach().clone() for n, p in fast.named_parameters() if p.requires_grad}
        opt.step()
        moved |= {n for n, p in fast.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    # each parameter moved at some step: a bf16 learned scale starting at 1.0 went up one ulp and back down by
    # the next step's (gpt2, three seeds in ten on the H100, 2026-12-05), so it can end where it started
    assert moved == {n for n, p in fast.named_parameters() if p.requires_grad}, "it trained"


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_placements_are_the_documented_ones(name):
    """Against an eager adapter written here from the placements' definitions, through plain forward hooks on
    the block's modules: after_attention on the attention output, parallel_feed_forward beside the FFN."""
    model, _ = build(name, "houlsby", placements=("after_attention", "parallel_feed_forward"))
    x = batch_for(name, 3)
    model.eval()
    with torch.no_grad():
        expected = model(**x).logits
    eager = copy.deepcopy(model)
    peftkern.remove_adapters(eager)
    sites = {"llama": ("self_attn.o_proj", "mlp"), "gpt2": ("attn.c_proj", "mlp"),
             "bert": ("attention.output.dense", None)}[name]
    for (_, layer, _), (_, src_layer, _) in zip(transformer_layers(eager), transformer_layers(model)):
        att, par = src_layer.bottleneck_adapters["after_attention"], src_layer.bottleneck_adapters[
            "parallel_feed_forward"]
        layer.get_submodule(sites[0]).register_forward_hook(lambda m, a, out, ad=att: out + _eager(ad, out))
        if sites[1] is not None:
            layer.get_submodule(sites[1]).register_forward_hook(lambda m, a, out, ad=par: out + _eager(ad, a[0]))
        else:  # BERT: the FFN's input is attention_output, its output the dense before BertOutput's LayerNorm
            store = {}
            layer.intermediate.register_forward_pre_hook(lambda m, a, s=store: s.update(x=a[0]))
            layer.output.dense.register_forward_hook(lambda m, a, out, ad=par, s=store: out + _eager(ad, s["x"]))
    with torch.no_grad():
        got = eager(**x).logits
    assert_close(got, expected, DTYPE, f"{name} placements")


def _eager(adapter, h):
    """s up(act(down(LN(h)))) as nn.Sequential-style PyTorch, in float32."""
    hf = h.float()
    if adapter.layer_norm is not None:
        hf = torch.nn.functional.layer_norm(hf, hf.shape[-1:], adapter.layer_norm.weight.float(),
                                            adapter.layer_norm.bias.float(), adapter.layer_norm.eps)
    z = torch.nn.functional.linear(hf, adapter.down.weight.float(), adapter.down.bias.float())
    a = reference.adapter_activation(z, adapter.non_linearity)[0]
    u = torch.nn.functional.linear(a, adapter.up.weight.float(), adapter.up.bias.float())
    s = adapter.scale.float() if adapter.scale is not None else adapter.scaling
    return (s * u).to(h.dtype)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_freezes_saves_and_loads_into_a_fresh_model(tmp_path, name):
    model, names = build(name, "houlsby", layer_norm=True, scaling="learned")
    base_keys = set(FACTORIES[name]().state_dict())
    assert base_keys <= set(model.state_dict()), "the base model's state_dict names are unchanged"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".bottleneck_adapters." in n for n in trainable), "everything else is frozen"
    assert len(names) == 2 * len(transformer_layers(model))
    peftkern.save_adapters(model, str(tmp_path))
    meta = json.loads((tmp_path / "bottleneck_adapter_config.json").read_text())
    assert meta["config"]["placements"] == ["after_attention", "after_feed_forward"]
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "bottleneck_adapter.safetensors"))
    assert set(saved) == set(trainable), "the file holds the adapter weights and nothing else"
    layer0 = transformer_layers(model)[0][0]
    assert saved[f"{layer0}.bottleneck_adapters.after_attention.down.weight"].shape == (8, 64)
    assert saved[f"{layer0}.bottleneck_adapters.after_feed_forward.scale"].shape == ()
    model.eval()
    x = batch_for(name, 5)
    with torch.no_grad():
        expected = model(**x).logits
    torch.manual_seed(run_seed(0))
    fresh = FACTORIES[name]().to(DEVICE, DTYPE).eval()
    with torch.no_grad():
        plain = fresh(**x).logits
    assert sorted(peftkern.load_adapters(fresh, str(tmp_path))) == sorted(names)
    with torch.no_grad():
        assert torch.equal(fresh(**x).logits, expected), "the reloaded model computes what the saved one did"
        peftkern.remove_adapters(fresh)
        assert torch.equal(fresh(**x).logits, plain), "remove_adapters restores the plain model"


def test_deepcopy_gives_the_copy_its_own_adapters():
    model, _ = build("llama", "pfeiffer")
    clone = copy.deepcopy(model).eval()
    model.eval()
    x = batch_for("llama", 2)
    with torch.no_grad():
        before = model(**x).logits
        for n, p in clone.named_parameters():
            if "bottleneck_adapters" in n:
                p.zero_()
        assert torch.equal(model(**x).logits, before), "changing the copy's adapters leaves the original alone"
        assert not torch.equal(clone(**x).logits, before)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="placements must be"):
        peftkern.AdapterConfig(placements=("after_embedding",))
    with pytest.raises(ValueError, match="unknown adapter preset"):
        peftkern.add_adapters(tiny_llama(), "lora")
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"unknown adapter config keys \['placement'\]"):
        peftkern.add_adapters(model, {"placement": ("after_attention",), "reduction_factor": 8})
    assert not adapters(model), "a refused config attaches nothing"
    with pytest.raises(ValueError, match="no such layer"):
        peftkern.add_adapters(tiny_llama(), peftkern.AdapterConfig(layers=(5,)))
    with pytest.raises(ValueError, match="found no"):
        peftkern.add_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    model = tiny_llama()
    peftkern.add_adapters(model, "pfeiffer")
    with pytest.raises(ValueError, match="already has an adapter"):
        peftkern.add_adapters(model, "pfeiffer")


def _trainable(model) -> set:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_a_second_call_keeps_the_first_adapters_and_saves_both(tmp_path):
    """freeze_base froze every parameter, the first call's adapters included, and the second call's config replaced
    the first's: save_adapters then wrote a file load_adapters refused."""
    model, _ = build("llama", "pfeiffer")
    first = _trainable(model)
    peftkern.add_adapters(model, peftkern.AdapterConfig(placements=("after_attention",), reduction_factor=8))
    assert first < _trainable(model), "the first call's adapters still train"
    with pytest.raises(ValueError, match="already has an adapter"):
        peftkern.add_adapters(model, "pfeiffer")
    peftkern.save_adapters(model, str(tmp_path))
    torch.manual_seed(run_seed(0))
    fresh = tiny_llama().to(DEVICE, DTYPE).eval()
    peftkern.load_adapters(fresh, str(tmp_path))
    model.eval()
    x = batch_for("llama", 3)
    with torch.no_grad():
        assert torch.equal(fresh(**x).logits, model(**x).logits)
    assert _trainable(fresh) == _trainable(model)


def test_a_refused_call_leaves_the_model_as_it_was():
    model, _ = build("llama", "pfeiffer")
    trainable = _trainable(model)
    model.eval()
    x = batch_for("llama", 4)
    with torch.no_grad():
        before = model(**x).logits
    for config in (peftkern.AdapterConfig(placements=("after_attention",), non_linearity="tanh"),
                   peftkern.AdapterConfig(placements=("after_attention",), layers=(0, 0))):
        with pytest.raises(ValueError):
            peftkern.add_adapters(model, config)
        assert _trainable(model) == trainable
        with torch.no_grad():
            assert torch.equal(model(**x).logits, before), "no hook or adapter was left behind"


def test_wrapped_models_save_and_load_the_inner_models_keys(tmp_path):
    """torch.compile's wrapper prefixes every key with _orig_mod.: the adapters' keys are the inner model's."""
    model, names = build("llama", "pfeiffer")
    compiled = torch.compile(model)
    assert set(adapter_state_dict(compiled)) == set(adapter_state_dict(model))
    peftkern.save_adapters(compiled, str(tmp_path))
    fresh = torch.compile(tiny_llama().to(DEVICE, DTYPE))
    assert sorted(peftkern.load_adapters(fresh, str(tmp_path))) == sorted(names)


def _llama_with_unknown_layers():
    """A tiny Llama of four layers whose layers 1 and 3 have no layout peftkern knows (their attention's output
    projection renamed), standing for layers of another kind in the stack."""
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(run_seed(0))
    model = transformers.LlamaForCausalLM(cfg)
    for i in (1, 3):
        attention = model.model.layers[i].self_attn
        attention.out = attention.o_proj
        del attention.o_proj
    return model


def test_layers_index_the_models_layer_stack_and_unknown_layers_are_named():
    """Layers of a kind peftkern has no layout for, between known ones, get no adapter, with a warning (they were
    skipped silently), and config.layers means model.layers.<i>."""
    model = _llama_with_unknown_layers()
    with pytest.warns(RuntimeWarning, match=r"model\.layers\.1"):
        names = peftkern.add_adapters(copy.deepcopy(model), "pfeiffer")
    assert [n.split(".bottleneck")[0] for n in names] == ["model.layers.0", "model.layers.2"]
    assert peftkern.add_adapters(copy.deepcopy(model), peftkern.AdapterConfig(layers=(2,))) == [
        "model.layers.2.bottleneck_adapters.after_feed_forward"]
    with pytest.raises(ValueError, match="layers it can adapt are"):
        peftkern.add_adapters(model, peftkern.AdapterConfig(layers=(1,)))


def test_a_format_1_file_loads_onto_a_model_with_gaps(tmp_path):
    """Files before format 2 counted config.layers over the adaptable layers only (the i-th one); on a model with
    gaps in its stack they are read so, not as stack positions."""
    model = _llama_with_unknown_layers()
    peftkern.add_adapters(model, peftkern.AdapterConfig(layers=(2,)))
    peftkern.save_adapters(model, str(tmp_path))
    path = tmp_path / "bottleneck_adapter_config.json"
    meta = json.loads(path.read_text())
    assert meta["format_version"] == 2
    meta.update(format_version=1, configs=None)
    meta["config"]["layers"] = [1]  # the second adaptable layer, as format 1 wrote it
    path.write_text(json.dumps(meta))
    fresh = _llama_with_unknown_layers()
    assert peftkern.load_adapters(fresh, str(tmp_path)) == ["model.layers.2.bottleneck_adapters.after_feed_forward"]


def test_adapters_beside_lora_on_gpt2s_projection():
    """GPT-2's c_proj wrapped by LoRA (peftkern's or PEFT's) is no longer a Conv1D by class name: the adapter's width
    came from the wrapper's weight read the Linear way, (in, out) taken as (out, in), and its first call raised."""
    torch.manual_seed(run_seed(0))
    model = tiny_gpt2().to(DEVICE, DTYPE)
    peftkern.add_lora(model, target_modules=["c_proj"], r=2)
    names = peftkern.add_adapters(model, peftkern.AdapterConfig(reduction_factor=8))
    assert all(adapters(model)[n].hidden_size == 64 for n in names)
    x = batch_for("gpt2", 1)
    model(**x).logits.float().sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_lora_after_adapters_on_the_same_projection_is_refused():
    """add_lora after add_adapters on the projection that carries an adapter's hook replaced the module and dropped
    the hook: the adapter stayed in the model and in its file but never ran. It raises now, before any change."""
    model = tiny_gpt2().to(DEVICE, DTYPE)
    peftkern.add_adapters(model, "pfeiffer")
    with pytest.raises(TypeError, match="call add_lora before add_adapters"):
        peftkern.add_lora(model, target_modules=["c_proj"], r=2)
    assert not any(isinstance(m, peftkern.nn.LoRALinear) for m in model.modules())


# ------------------------------------------------------------------------------------------- AdapterHub


def adapterhub_tensors(model_name, name="task", ln_before=False, learned=False, d=64, b=8):
    """An AdapterHub bottleneck checkpoint's tensors, keys as AdapterHub lays them out: BERT puts the adapters
    in attention.output / output, decoders in per-layer attention_adapters / output_adapters; the Linear is
    adapter_down.0 (adapter_down.1 after an ln_before LayerNorm, which is also adapter_down.0)."""
    g = torch.Generator().manual_seed(run_seed(11))
    sites = {"bert": ["bert.encoder.layer.{i}.attention.output", "bert.encoder.layer.{i}.output"],
             "llama": ["model.layers.{i}.attention_adapters", "model.layers.{i}.output_adapters"]}[model_name]
    state = {}
    for i in range(2):
        for site in sites:
            prefix = f"{site.format(i=i)}.adapters.{name}."
            linear = "adapter_down.1." if ln_before else "adapter_down.0."
            state[prefix + linear + "weight"] = torch.randn(b, d, generator=g) * 0.1
            state[prefix + linear + "bias"] = torch.randn(b, generator=g) * 0.1
            state[prefix + "adapter_up.weight"] = torch.randn(d, b, generator=g) * 0.1
            state[prefix + "adapter_up.bias"] = torch.randn(d, generator=g) * 0.1
            if ln_before:
                lw, lb = 1 + 0.1 * torch.randn(d, generator=g), 0.1 * torch.randn(d, generator=g)
                state[prefix + "adapter_norm_before.weight"] = state[prefix + "adapter_down.0.weight"] = lw
                state[prefix + "adapter_norm_before.bias"] = state[prefix + "adapter_down.0.bias"] = lb
            if learned:
                state[prefix + "scaling"] = 1 + 0.1 * torch.randn(1, generator=g)
    config = dict(mh_adapter=True, output_adapter=True, reduction_factor=8, non_linearity="swish",
                  original_ln_before=False, original_ln_after=True, residual_before_ln=True, ln_before=ln_before,
                  ln_after=False, scaling="learned" if learned else 1.0, is_parallel=False)
    return state, config


@pytest.mark.parametrize("model_name,ln_before,learned", [("bert", False, False), ("llama", True, True)])
def test_adapterhub_checkpoint_loads(tmp_path, model_name, ln_before, learned):
    state, config = adapterhub_tensors(model_name, ln_before=ln_before, learned=learned)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"config": config, "name": "task"}))
    torch.save(state, tmp_path / "pytorch_adapter.bin")
    torch.manual_seed(run_seed(0))
    model = FACTORIES[model_name]().to(DEVICE)
    names = peftkern.load_adapterhub(model, str(tmp_path))
    assert len(names) == 4
    site = {"bert": ("bert.encoder.layer.1.attention.output", "bert.encoder.layer.1.output"),
            "llama": ("model.layers.1.attention_adapters", "model.layers.1.output_adapters")}[model_name]
    found = adapters(model)
    for placement, prefix in zip(("after_attention", "after_feed_forward"), site):
        layer = "bert.encoder.layer.1" if model_name == "bert" else "model.layers.1"
        adapter = found[f"{layer}.bottleneck_adapters.{placement}"]
        ah = f"{prefix}.adapters.task."
        linear = "adapter_down.1." if ln_before else "adapter_down.0."
        assert torch.equal(adapter.down.weight.cpu(), state[ah + linear + "weight"])
        assert torch.equal(adapter.up.bias.cpu(), state[ah + "adapter_up.bias"])
        assert adapter.non_linearity == "silu"
        if ln_before:
            assert torch.equal(adapter.layer_norm.weight.cpu(), state[ah + "adapter_norm_before.weight"])
        if learned:
            assert adapter.scale.item() == state[ah + "scaling"].item()
    assert all(".bottleneck_adapters." in n for n, p in model.named_parameters() if p.requires_grad)


def test_adapterhub_converter_keys_and_limits():
    state, config = adapterhub_tensors("bert")
    converted, ours = peftkern.convert_adapterhub(state, config)
    assert ours.placements == ("after_attention", "after_feed_forward") and ours.bottleneck_size == 8
    assert torch.equal(converted["bert.encoder.layer.0.bottleneck_adapters.after_feed_forward.down.weight"],
                       state["bert.encoder.layer.0.output.adapters.task.adapter_down.0.weight"])
    assert len(converted) == len(state)
    # a parallel adapter: at the attention site there is no parallel placement, and it was made a sequential one; at
    # the FFN it converts, with a warning where the input differs (pre-LN models); a review, 2026-12-05
    with pytest.raises(ValueError, match="parallel adapter at the attention"):
        peftkern.convert_adapterhub(state, {**config, "is_parallel": True})
    ffn_only = {k: v for k, v in state.items() if ".attention." not in k}
    with pytest.warns(RuntimeWarning, match="pre-LN"):
        parallel, ours_par = peftkern.convert_adapterhub(ffn_only, {**config, "is_parallel": True,
                                                                    "mh_adapter": False})
    assert ours_par.placements == ("parallel_feed_forward",)
    # a decoder's cross-attention adapters have no placement: they were dropped without a word
    cross = {**state, **{k.replace(".attention.output.", ".crossattention.output.").replace(
        ".output.adapters.", ".cross_attention_adapters.adapters."): v for k, v in state.items()
        if ".attention.output." in k}}
    with pytest.raises(ValueError, match="cross-attention"):
        peftkern.convert_adapterhub(cross, config)
    with pytest.warns(RuntimeWarning, match="original_ln_before"):
        peftkern.convert_adapterhub(state, {**config, "original_ln_before": True})
    with pytest.warns(RuntimeWarning, match="original_ln_after=False"):
        peftkern.convert_adapterhub(state, {**config, "original_ln_after": False})
    with pytest.raises(ValueError, match="no peftkern counterpart"):
        peftkern.convert_adapterhub({**state, "bert.encoder.layer.0.output.adapters.task.gate.weight":
                                     torch.zeros(1, 64)}, config)
    two = {**state, **{k.replace(".task.", ".other."): v for k, v in state.items()}}
    with pytest.raises(ValueError, match="pass adapter_name"):
        peftkern.convert_adapterhub(two, config)
    assert peftkern.convert_adapterhub(two, config, adapter_name="other")[1].bottleneck_size == 8
    # transformers' names for the two GELUs, which AdapterHub takes from ACT2FN; no activation given is relu, said; a
    # learned scaling with no tensor for it is named (each raised or passed unsaid: an exploratory test, 2026-12-07)
    assert peftkern.convert_adapterhub(state, {**config, "non_linearity": "gelu_pytorch_tanh"})[1].non_linearity == \
        "gelu_tanh"
    assert peftkern.convert_adapterhub(state, {**config, "non_linearity": "gelu_python"})[1].non_linearity == "gelu"
    with pytest.warns(RuntimeWarning, match="relu assumed"):
        assert peftkern.convert_adapterhub(state)[1].non_linearity == "relu"
    with pytest.raises(ValueError, match="holds no adapter's 'scaling' tensor"):
        peftkern.convert_adapterhub(state, {**config, "scaling": "learned"})


def test_adapterhub_t5_checkpoint_loads_onto_its_sub_layers():
    """AdapterHub's T5 adapters sit on the sub-layers themselves (keys <stack>.block.<i>.layer.<j>.adapters.<name>.,
    adapters/models/t5/mixin_t5.py): the self-attention (j = 0) and the feed-forward block (j = 1 in the encoder, 2 in
    the decoder). The converter found none of these keys (an exploratory test, 2026-12-07); the decoder's
    cross-attention (j = 1) has no placement and is refused."""
    d, b = 32, 4
    state = {}
    for stack, subs in (("encoder", (0, 1)), ("decoder", (0, 2))):
        for i in range(2):
            for j in subs:
                prefix = f"{stack}.block.{i}.layer.{j}.adapters.task."
                state.update({prefix + "adapter_down.0.weight": torch.randn(b, d), prefix + "adapter_down.0.bias":
                              torch.randn(b), prefix + "adapter_up.weight": torch.randn(d, b),
                              prefix + "adapter_up.bias": torch.randn(d)})
    config = dict(mh_adapter=True, output_adapter=True, non_linearity="swish", original_ln_before=False,
                  original_ln_after=True, residual_before_ln=True, ln_before=False, ln_after=False, scaling=1.0)
    torch.manual_seed(run_seed(0))
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=64, d_model=d, d_kv=8, d_ff=64,
                                                                          num_layers=2, num_heads=4)).to(DEVICE)
    assert len(peftkern.load_adapterhub(model, state, config)) == 8
    found = adapters(model)
    for (stack, j), placement in (("encoder", 0), "after_attention"), (("encoder", 1), "after_feed_forward"), \
            (("decoder", 0), "after_attention"), (("decoder", 2), "after_feed_forward"):
        adapter = found[f"{stack}.block.1.bottleneck_adapters.{placement}"]
        assert torch.equal(adapter.down.weight.cpu(), state[f"{stack}.block.1.layer.{j}.adapters.task."
                                                            "adapter_down.0.weight"])
        assert torch.equal(adapter.up.bias.cpu(), state[f"{stack}.block.1.layer.{j}.adapters.task.adapter_up.bias"])
        assert adapter.non_linearity == "silu"
    cross = {**state, **{k.replace(".layer.2.", ".layer.1."): v for k, v in state.items() if ".layer.2." in k}}
    with pytest.raises(ValueError, match="cross-attention"):
        peftkern.convert_adapterhub(cross, config)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_sequential_and_parallel_feed_forward_adapters_compose_in_either_order(name):
    """Pfeiffer (after the FFN) and a parallel adapter beside it: the parallel one adds s ad_p(x) to the FFN's output
    with the sequential adapter applied, whichever was added first. In BERT (and OPT, BART, MoE blocks) both hook the
    same module, and the one added last wrapped the other (BERT 1.2e-2 off, OPT 0.27, a review, 2026-12-05); in
    GPT-2 the sequential hook sits inside the parallel one's module, so the order never mattered."""
    torch.manual_seed(run_seed(0))
    base = FACTORIES[name]().to(DEVICE, DTYPE).eval()
    first, second = copy.deepcopy(base), copy.deepcopy(base)
    peftkern.add_adapters(first, peftkern.AdapterConfig(placements=("after_feed_forward",), reduction_factor=8))
    peftkern.add_adapters(first, peftkern.AdapterConfig(placements=("parallel_feed_forward",), reduction_factor=8))
    peftkern.add_adapters(second, peftkern.AdapterConfig(placements=("parallel_feed_forward",), reduction_factor=8))
    peftkern.add_adapters(second, peftkern.AdapterConfig(placements=("after_feed_forward",), reduction_factor=8))
    draw_adapters(first, 0.3)
    second.load_state_dict(first.state_dict())
    x = batch_for(name, 3)
    with torch.no_grad():
        assert_close(second(**x).logits, first(**x).logits, DTYPE, f"{name}: parallel first against sequential first")


# load / remove as a resume or a refusal meets them (a review, 2026-12-05); each test failed before its fix.


def test_load_adapters_into_the_same_adapters_resumes(tmp_path):
    """A model with the file's adapters attached already (add_adapters, or a load before) loads into them: this
    raised 'already has an adapter'. One that has some of them and not others is a clear error."""
    source, _ = build("llama", "houlsby")
    x = batch("llama")
    expected = source.eval()(**x).logits
    peftkern.save_adapters(source, str(tmp_path))
    target, _ = build("llama", "houlsby")  # the same config, its own random adapters
    with torch.no_grad():
        for p in adapters(target)[next(iter(adapters(target)))].parameters():
            p.add_(1.0)
    for _ in range(2):
        assert sorted(peftkern.load_adapters(target, str(tmp_path))) == sorted(adapters(source))
        assert_close(target.eval()(**x).logits, expected, DTYPE, "resumed")
    partial, _ = build("llama", "houlsby", layers=(0,))
    with pytest.raises(ValueError, match="some of its adapters"):
        peftkern.load_adapters(partial, str(tmp_path))
    # the same tensors' shapes, another activation: the file's configuration is checked (the first version loaded
    # the weights into silu adapters, 0.033 off the saved model: the review of the change)
    other, _ = build("llama", "houlsby", non_linearity="gelu")
    with pytest.raises(ValueError, match="the file's configuration makes"):
        peftkern.load_adapters(other, str(tmp_path))


def test_a_refused_load_leaves_the_model_as_it_was(tmp_path):
    """A file that does not fit (another hidden size): the adapters were attached before the check and stayed, with
    their initial weights, and the base was left frozen."""
    source, _ = build("llama", "pfeiffer")
    peftkern.save_adapters(source, str(tmp_path))
    torch.manual_seed(run_seed(1))
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)
    other = transformers.LlamaForCausalLM(cfg).to(DEVICE, DTYPE)
    state = copy.deepcopy(other.state_dict())
    x = batch("llama")
    before = other.eval()(**x).logits
    with pytest.raises(ValueError, match="hidden size or reduction factor"):
        peftkern.load_adapters(other, str(tmp_path))
    assert not adapters(other) and all(p.requires_grad for p in other.parameters())
    assert other.state_dict().keys() == state.keys() and not peftkern.integrations.adapters._configs(other)
    assert torch.equal(other(**x).logits, before), "no hook left behind"


def test_load_adapters_of_another_placement_adds_them(tmp_path):
    """A file whose adapters sit where the model has none adds them beside the model's own (as a second
    add_adapters call does); this raised, naming the model's own adapters as missing."""
    source, _ = build("llama", "houlsby")
    peftkern.save_adapters(source, str(tmp_path))
    target, _ = build("llama", "parallel")
    own = set(adapters(target))
    names = peftkern.load_adapters(target, str(tmp_path))
    assert set(names) == set(adapters(source)) and set(adapters(target)) == own | set(names)
    for key, tensor in adapter_state_dict(source).items():
        assert torch.equal(adapter_state_dict(target)[key], tensor)


def test_remove_and_save_whichever_module_add_was_called_on(tmp_path):
    """add_adapters(m.model) then remove_adapters(m) (or the other way round): the hook handles and configs lived on
    the module add_adapters was given, so the adapters ran on after their modules were gone (3.6e-4 off), and
    save_adapters(m) said no adapters were attached."""
    torch.manual_seed(run_seed(0))
    base = tiny_llama().to(DEVICE, DTYPE).eval()
    x = batch("llama")
    expected = base(**x).logits
    for add_on, remove_on in (("inner", "outer"), ("outer", "inner")):
        model = copy.deepcopy(base)
        pick = {"inner": model.model, "outer": model}
        peftkern.add_adapters(pick[add_on], "pfeiffer")
        with torch.no_grad():
            for p in adapters(model).values():
                p.up.weight.normal_(0, 0.5)
        assert not torch.equal(model(**x).logits, expected)
        if add_on == "inner":
            peftkern.save_adapters(pick[remove_on], str(tmp_path / add_on))
        peftkern.remove_adapters(pick[remove_on])
        assert not adapters(model)
        assert torch.equal(model(**x).logits, expected), f"add on {add_on}, remove on {remove_on}"


def test_modules_to_save_train_and_save_with_the_adapters(tmp_path):
    """A classifier head made at random trains beside the adapters (add_adapters froze it, as PEFT does not with
    modules_to_save), stays trainable through a second call, and save_adapters / load_adapters carry it."""
    torch.manual_seed(run_seed(0))
    model = tiny_bert().to(DEVICE, DTYPE)
    head = model.classifier.weight.detach().clone()
    peftkern.add_adapters(model, "pfeiffer", modules_to_save=["classifier"])
    peftkern.add_adapters(model, dict(placements=("after_attention",)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(".bottleneck_adapters." in n for n in trainable - {"classifier.weight", "classifier.bias"})
    train_steps(model, "bert", None, steps=2)
    assert not torch.equal(model.classifier.weight, head), "the head trained"
    model.eval()
    x = batch_for("bert", 5)
    with torch.no_grad():
        expected = model(**x).logits
    peftkern.save_adapters(model, str(tmp_path))
    assert json.loads((tmp_path / "bottleneck_adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    torch.manual_seed(run_seed(0))  # the same base and the untrained head: the file's head must replace it
    fresh = tiny_bert().to(DEVICE, DTYPE).eval()
    peftkern.load_adapters(fresh, str(tmp_path))
    assert fresh.classifier.weight.requires_grad
    with torch.no_grad():
        assert torch.equal(fresh(**x).logits, expected)
    peftkern.remove_adapters(fresh)  # the head is frozen again, as the rest of the model stays
    assert not any(p.requires_grad for p in fresh.parameters())
    other = tiny_bert()
    other.classifier = torch.nn.Linear(64, 5)  # another head's size: refused before an adapter attaches
    with pytest.raises(ValueError, match="shape"):
        peftkern.load_adapters(other, str(tmp_path))
    assert not adapters(other) and all(p.requires_grad for p in other.parameters())
    with pytest.raises(ValueError, match="named no module"):
        peftkern.add_adapters(other, modules_to_save=["score"])
    assert not adapters(other)


def _vision(kind):
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=8,
                 patch_size=4)
    if kind == "videomae":
        model = transformers.VideoMAEModel(transformers.VideoMAEConfig(num_frames=2, tubelet_size=2, **small))
        return model, torch.randn(1, 2, 3, 8, 8)
    return transformers.Data2VecVisionModel(transformers.Data2VecVisionConfig(**small)), torch.randn(1, 3, 8, 8)


@pytest.mark.parametrize("kind", ["videomae", "data2vec-vision"])
def test_parallel_adapter_reads_the_feed_forward_input_of_pre_ln_encoders(kind):
    """Encoders that reuse BERT's module names with the LayerNorm before the feed-forward block: the parallel adapter
    took BertOutput's input_tensor, which is the un-normalised residual there (VideoMAE, YOLOS: 1.6 off the block's
    input), or absent (Data2VecVision: every forward raised IndexError; a review, 2026-12-05). It reads what
    intermediate reads, as in BERT."""
    torch.manual_seed(run_seed(0))
    model, pixels = _vision(kind)
    model = model.to(DEVICE).eval()
    peftkern.add_adapters(model, "parallel")
    layer = model.encoder.layer[0]
    seen = {}
    layer.bottleneck_adapters["parallel_feed_forward"].register_forward_pre_hook(
        lambda m, args: seen.update(adapter=args[0]))
    layer.intermediate.register_forward_pre_hook(lambda m, args: seen.update(block=args[0]))
    with torch.no_grad():
        model(pixel_values=pixels.to(DEVICE))
    assert torch.equal(seen["adapter"], seen["block"])


def _more_layouts():
    """Tiny models of the layouts beyond Llama, GPT-2 and BERT: (model, inputs, the sites written out here: attention
    output, and the feed-forward module or its first and last projections)."""
    T = transformers
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    ids = torch.randint(0, 64, (2, 6))
    text = {"input_ids": ids}
    return {
        "opt": (lambda: T.OPTForCausalLM(T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                     num_attention_heads=4, vocab_size=64, word_embed_proj_dim=32)),
                text, ("self_attn.out_proj", ("fc1", "fc2"))),
        "bart": (lambda: T.BartForConditionalGeneration(T.BartConfig(
                     d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64)),
                 {"input_ids": ids, "decoder_input_ids": ids}, ("self_attn.out_proj", ("fc1", "fc2"))),
        "phi": (lambda: T.PhiForCausalLM(T.PhiConfig(vocab_size=64, **small)), text, ("self_attn.dense", "mlp")),
        "gpt_neox": (lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=64, **small)), text,
                     ("attention.dense", "mlp")),
        "falcon": (lambda: T.FalconForCausalLM(T.FalconConfig(hidden_size=32, num_attention_heads=4,
                                                              num_hidden_layers=2, vocab_size=64)),
                   text, ("self_attention.dense", "mlp")),
        "distilbert": (lambda: T.DistilBertModel(T.DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                                                                    vocab_size=64)), text,
                       ("attention.out_lin", "ffn")),
        "clip": (lambda: T.CLIPTextModel(T.CLIPTextConfig(vocab_size=64, **small)), text,
                 ("self_attn.out_proj", "mlp")),
        "vit": (lambda: T.ViTModel(T.ViTConfig(image_size=8, patch_size=4, **small)),
                {"pixel_values": torch.randn(2, 3, 8, 8)}, ("attention.o_proj", "mlp")),
        "mixtral": (lambda: T.MixtralForCausalLM(T.MixtralConfig(num_key_value_heads=2, vocab_size=64,
                                                                 num_local_experts=4, **small)),
                    text, ("self_attn.o_proj", "mlp")),
        # a T5 decoder block's feed-forward is its layer.2, an encoder block's layer.1: the layout names it (None)
        "t5": (lambda: T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                               num_decoder_layers=1, num_heads=4, vocab_size=64)),
               {"input_ids": ids, "decoder_input_ids": ids}, ("layer.0.SelfAttention.o", None)),
        "mt5": (lambda: T.MT5ForConditionalGeneration(T.MT5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                                  num_decoder_layers=1, num_heads=4, vocab_size=64)),
                {"input_ids": ids, "decoder_input_ids": ids}, ("layer.0.SelfAttention.o", None)),
        "qwen2_moe": (lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
                          num_key_value_heads=2, vocab_size=64, num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=16, shared_expert_intermediate_size=16, **small)),
                      text, ("self_attn.o_proj", "mlp")),
    }


def _first_output(out):
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize("arch", ["opt", "bart", "phi", "gpt_neox", "falcon", "distilbert", "clip", "vit", "mixtral",
                                  "qwen2_moe", "t5", "mt5"])
def test_more_layouts_take_the_documented_placements(arch, tmp_path):
    """add_adapters refused these models ("found no Llama-, GPT-2- or BERT-style transformer layers", a review,
    2026-12-05; the mixtures of experts, whose every layer is one, too). Each now gets houlsby's and the parallel
    placements, checked against an eager adapter through plain
    hooks at the sites named here; the weights save and load."""
    make, inputs, (attention, feed_forward) = _more_layouts()[arch]
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    torch.manual_seed(run_seed(0))
    model = make().to(DEVICE).eval()
    with torch.no_grad():
        base = _first_output(model(**inputs))
    names = peftkern.add_adapters(model, peftkern.AdapterConfig(**{
        **peftkern.integrations.adapters.PRESETS["houlsby"], "reduction_factor": 4,
        "placements": ("after_attention", "parallel_feed_forward")}))
    assert len(names) == 2 * len(transformer_layers(model)) and len(transformer_layers(model)) >= 2
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".bottleneck_adapters." in n and p.dim() > 0 and "layer_norm" not in n:
                p.normal_(0, 0.1)
        expected = _first_output(model(**inputs))
    assert (expected - base).abs().max() > 1e-3, "the adapters run"
    eager = copy.deepcopy(model)
    peftkern.remove_adapters(eager)
    for (_, layer, layout), (_, source, _) in zip(transformer_layers(eager), transformer_layers(model)):
        att, par = (source.bottleneck_adapters[p] for p in ("after_attention", "parallel_feed_forward"))
        layer.get_submodule(attention).register_forward_hook(lambda m, a, out, ad=att: out + _eager(ad, out))
        if feed_forward is None or isinstance(feed_forward, str):
            layer.get_submodule(feed_forward or layout.feed_forward).register_forward_hook(
                lambda m, a, out, ad=par: out + _eager(ad, a[0]))
        else:  # the feed-forward block is the layer's own fc1 ... fc2
            store = {}
            layer.get_submodule(feed_forward[0]).register_forward_pre_hook(lambda m, a, s=store: s.update(x=a[0]))
            layer.get_submodule(feed_forward[1]).register_forward_hook(
                lambda m, a, out, ad=par, s=store: out + _eager(ad, s["x"]))
    with torch.no_grad():
        assert_close(_first_output(eager(**inputs)), expected, torch.float32, f"{arch} placements")
    peftkern.save_adapters(model, str(tmp_path))
    torch.manual_seed(run_seed(0))
    fresh = make().to(DEVICE).eval()
    peftkern.load_adapters(fresh, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(_first_output(fresh(**inputs)), expected)


class _TupleMoE(torch.nn.Module):
    """A feed-forward block that returns its router logits beside its output, as transformers 4's Mixtral did."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, h):
        return self.fc(h), h.sum(-1)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = torch.nn.Module()
        self.self_attn.o_proj = torch.nn.Linear(16, 16)
        self.mlp = _TupleMoE()

    def forward(self, x):
        h = x + self.self_attn.o_proj(x)
        out, _ = self.mlp(h)
        return h + out


@pytest.mark.parametrize("preset", ["pfeiffer", "parallel"])
def test_a_block_that_returns_a_tuple_gets_its_adapter_on_the_hidden_states(preset):
    """The adapter hooks apply to the first element of a tuple output (hidden states, router logits) and pass the
    rest on."""
    torch.manual_seed(run_seed(0))
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([_Block(), _Block()])}).to(DEVICE)
    peftkern.add_adapters(model, preset)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".bottleneck_adapters." in n and p.dim() > 0 and "layer_norm" not in n:
                p.normal_(0, 0.1)
    x = torch.randn(3, 16, device=DEVICE)
    got = x
    for layer in model["layers"]:
        got = layer(got)
    want = x
    for layer in model["layers"]:
        adapter = next(iter(layer.bottleneck_adapters.values()))
        h = want + layer.self_attn.o_proj(want)
        out = layer.mlp.fc(h)
        want = h + out + _eager(adapter, h if preset == "parallel" else out)
    assert_close(got, want, torch.float32, f"{preset} on a tuple-returning block")


def test_a_language_model_beside_a_vision_tower_keeps_its_adapters_alone():
    """The layouts added on 2026-12-05 (CLIP, ViT, ...) also matched a vision-language model's tower, which moved the
    adapters and config.layers' indices there, and a file saved before no longer loaded (a review). Where a model has
    layers of the Llama / GPT-2 / BERT layouts, those alone take adapters, as before."""
    model = torch.nn.Module()
    model.vision_tower = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
    model.language_model = tiny_llama()
    names = peftkern.add_adapters(model, "pfeiffer")
    assert names and all(n.startswith("language_model.") for n in names)
    fresh = torch.nn.Module()
    fresh.language_model = tiny_llama()
    assert peftkern.add_adapters(fresh, peftkern.AdapterConfig(layers=(0,))) == [
        "language_model.model.layers.0.bottleneck_adapters.after_feed_forward"]


def test_load_adapters_resumes_into_layers_compiled_in_place(tmp_path):
    """Each layer replaced by torch.compile(layer), as accelerate's regional compilation does: save_adapters then
    load_adapters into the same model resumed at fab107c and raised "already has an adapter" after the day's name
    cleaning (a review, 2026-12-05)."""
    model = tiny_llama()
    names = peftkern.add_adapters(model, "pfeiffer")
    for i, layer in enumerate(model.model.layers):
        model.model.layers[i] = torch.compile(layer, backend="eager")
    peftkern.save_adapters(model, str(tmp_path))
    assert len(peftkern.load_adapters(model, str(tmp_path))) == len(names)


def test_load_adapters_keeps_the_files_dtype(tmp_path):
    """float32 adapters saved beside a bf16 model came back in bf16, rounded (2e-3 off the saved model's logits, a
    review, 2026-12-05): without adapter_dtype the load takes the file's."""
    peftkern.set_backend("torch")
    torch.manual_seed(run_seed(0))
    base = tiny_llama().to(DEVICE, torch.bfloat16).eval()
    model = copy.deepcopy(base)
    peftkern.add_adapters(model, peftkern.AdapterConfig(**{**peftkern.integrations.adapters.PRESETS["houlsby"],
                                                          "reduction_factor": 8}), adapter_dtype=torch.float32)
    draw_adapters(model, 0.1)
    peftkern.save_adapters(model, str(tmp_path))
    fresh = copy.deepcopy(base)
    peftkern.load_adapters(fresh, str(tmp_path))
    assert {p.dtype for n, p in fresh.named_parameters() if ".bottleneck_adapters." in n} == {torch.float32}
    x = batch_for("llama", 2)
    with torch.no_grad():
        assert torch.equal(fresh(**x).logits, model(**x).logits)
    bf16 = copy.deepcopy(base)
    peftkern.load_adapters(bf16, str(tmp_path), adapter_dtype=torch.bfloat16)  # asked for: as asked
    assert {p.dtype for n, p in bf16.named_parameters() if ".bottleneck_adapters." in n} == {torch.bfloat16}


def test_adapters_added_to_a_decoder_alone_reload_into_the_whole_model(tmp_path):
    """add_adapters(model.model.decoder) counts the decoder's layers; saved from the whole BART model, the file said
    layers 0.. of the whole model, which are the encoder's: the load raised 'does not fit' (a review, 2026-12-05)."""
    torch.manual_seed(run_seed(0))
    cfg = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64)
    base = transformers.BartForConditionalGeneration(cfg).to(DEVICE).eval()
    model = copy.deepcopy(base)
    peftkern.add_adapters(model.model.decoder, peftkern.AdapterConfig(placements=("after_feed_forward",),
                                                                       reduction_factor=4))
    draw_adapters(model, 0.3)
    peftkern.save_adapters(model, str(tmp_path))
    fresh = copy.deepcopy(base)
    names = peftkern.load_adapters(fresh, str(tmp_path))
    assert names and all(n.startswith("model.decoder.") for n in names), names
    ids = torch.randint(0, 64, (2, 8), device=DEVICE)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, decoder_input_ids=ids).logits,
                           model(input_ids=ids, decoder_input_ids=ids).logits)


def _saved_copy(base, preset, path):
    """A copy of `base` with `preset` adapters, drawn away from their init, saved to `path`."""
    model = copy.deepcopy(base)
    peftkern.add_adapters(model, preset)
    draw_adapters(model, 0.3)
    peftkern.save_adapters(model, str(path))
    return model


def test_adapters_load_into_the_same_layers_under_another_head_or_peft(tmp_path):
    """Adapters saved from BertForSequenceClassification (layers bert.encoder.layer.<i>) load into its BertModel
    (encoder.layer.<i>); saved from a plain Llama, into the same model wrapped by PEFT (base_model.model.<...>), and
    back. Before, load_adapters matched the names as written and refused each of these as 'a different configuration'
    (an exploratory test, 2026-12-07)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(run_seed(0))
    base = tiny_bert().to(DEVICE).eval()
    model = _saved_copy(base, "pfeiffer", tmp_path / "bert")
    bare = copy.deepcopy(base.bert)
    names = peftkern.load_adapters(bare, str(tmp_path / "bert"))
    assert names and all(n.startswith("encoder.layer.") for n in names), names
    ids = torch.randint(0, 128, (2, 8), device=DEVICE)
    with torch.no_grad():
        assert torch.equal(bare(input_ids=ids).last_hidden_state, model.bert(input_ids=ids).last_hidden_state)

    torch.manual_seed(run_seed(1))
    base = tiny_llama().to(DEVICE).eval()
    plain = _saved_copy(base, "houlsby", tmp_path / "plain")
    wrapped = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    names = peftkern.load_adapters(wrapped, str(tmp_path / "plain"))
    assert names and all(n.startswith("base_model.model.model.layers.") for n in names), names
    peftkern.save_adapters(wrapped, str(tmp_path / "wrapped"))
    back = copy.deepcopy(base)
    peftkern.load_adapters(back, str(tmp_path / "wrapped"))
    with torch.no_grad():  # PEFT's LoRA B starts at zero: the three compute the same
        expected = plain(input_ids=ids).logits
        assert torch.equal(wrapped(input_ids=ids).logits, expected)
        assert torch.equal(back(input_ids=ids).logits, expected)
    # another architecture of the same width and depth is refused, as before: the first version renamed a GPT-2's
    # transformer.h.<i> to a Llama's model.layers.<i> (the review of the change); the error names both layer classes,
    # where it hinted at a layer norm or a learned scale alone (a documentation audit, 2026-12-07)
    _saved_copy(tiny_gpt2().to(DEVICE), "pfeiffer", tmp_path / "gpt2")
    with pytest.raises(ValueError, match="does not fit") as err:
        peftkern.load_adapters(copy.deepcopy(base), str(tmp_path / "gpt2"))
    assert "GPT2Block layers; this model's are LlamaDecoderLayer" in str(err.value)


def test_numpy_and_tensor_numbers_in_the_config_are_saved_as_numbers(tmp_path):
    """A numpy or 0-d tensor scaling (or size) trained as well as a float, then save_adapters could not write it to
    JSON and left a config file cut off at "scaling": (an exploratory test, 2026-12-07)."""
    np = pytest.importorskip("numpy")
    torch.manual_seed(run_seed(0))
    model = tiny_llama().to(DEVICE)
    peftkern.add_adapters(model, peftkern.AdapterConfig(scaling=np.float32(2.0), reduction_factor=np.int64(8)))
    peftkern.add_adapters(model, peftkern.AdapterConfig(placements="after_attention", scaling=torch.tensor(0.5),
                                                        bottleneck_size=np.int64(4)))
    peftkern.save_adapters(model, str(tmp_path))
    meta = json.loads((tmp_path / "bottleneck_adapter_config.json").read_text())
    assert [(c["scaling"], c["reduction_factor"], c["bottleneck_size"]) for c in meta["configs"]] == \
        [(2.0, 8, None), (0.5, 16, 4)]
    fresh = tiny_llama().to(DEVICE)
    assert sorted(peftkern.load_adapters(fresh, str(tmp_path))) == sorted(adapters(model))
    with pytest.raises(TypeError, match="scaling must be one number"):
        peftkern.AdapterConfig(scaling=torch.tensor([0.5, 1.0]))
    with pytest.raises(TypeError, match="reduction_factor must be one number"):
        peftkern.AdapterConfig(reduction_factor=np.array([4, 2]))


# Wrapped layers, and AdapterHub's other files (a review, 2026-12-06); each test failed before its fix.


def _checkpoint_wrapped(model):
    """model with each decoder layer wrapped by torch's activation-checkpointing CheckpointWrapper (as FSDP recipes and
    accelerate's activation_checkpointing apply it), whose children are <layer>._checkpoint_wrapped_module."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    layer_class = type(transformer_layers(model)[0][1])
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, layer_class))
    return model


def test_load_and_remove_adapters_of_layers_wrapped_for_activation_checkpointing(tmp_path):
    """Layers wrapped after add_adapters: their adapters' names hold _checkpoint_wrapped_module., which the file leaves
    out, so load_adapters into them (a resume) raised 'already has an adapter'; and remove_adapters raised
    AttributeError on the wrapper (which shows its inner module's attributes) after taking the hooks off."""
    source, _ = build("llama", "houlsby")
    _checkpoint_wrapped(source).eval()
    x = batch_for("llama", 6)
    with torch.no_grad():
        expected = source(**x).logits
    peftkern.save_adapters(source, str(tmp_path))
    target, _ = build("llama", "houlsby")  # the same base, its own adapter weights
    draw_adapters(target, 0.2)
    _checkpoint_wrapped(target).eval()
    with torch.no_grad():
        assert not torch.equal(target(**x).logits, expected)
    assert sorted(peftkern.load_adapters(target, str(tmp_path))) == sorted({_adapter_of(k) for k in
                                                                           adapter_state_dict(source)})
    with torch.no_grad():
        assert torch.equal(target(**x).logits, expected), "the resume loaded the file's weights"
    torch.manual_seed(run_seed(0))
    plain = FACTORIES["llama"]().to(DEVICE, DTYPE).eval()
    with torch.no_grad():
        base = plain(**x).logits
    peftkern.remove_adapters(target)
    assert not adapters(target)
    with torch.no_grad():
        assert torch.equal(target(**x).logits, base), "remove_adapters restores the plain model"


def test_a_resume_into_layers_compiled_in_place_checks_the_files_configuration(tmp_path):
    """Each layer replaced by torch.compile(layer): the check of the file's configuration against the attached adapters
    looked them up by the layer's name without _orig_mod., found none, and loaded silu adapters' weights into gelu
    ones without a word."""
    def compiled(activation):
        torch.manual_seed(run_seed(0))
        model = tiny_llama().to(DEVICE, DTYPE)
        peftkern.add_adapters(model, peftkern.AdapterConfig(non_linearity=activation, reduction_factor=8))
        for i, layer in enumerate(model.model.layers):
            model.model.layers[i] = torch.compile(layer, backend="eager")
        return model

    source = compiled("silu")
    draw_adapters(source, 0.2)
    peftkern.save_adapters(source, str(tmp_path))
    other = compiled("gelu")
    before = {k: v.clone() for k, v in adapter_state_dict(other).items()}
    with pytest.raises(ValueError, match="the file's configuration makes"):
        peftkern.load_adapters(other, str(tmp_path))
    assert all(torch.equal(v, before[k]) for k, v in adapter_state_dict(other).items()), "nothing was loaded"
    same = compiled("silu")
    peftkern.load_adapters(same, str(tmp_path))
    assert all(torch.equal(v, adapter_state_dict(source)[k]) for k, v in adapter_state_dict(same).items())


def test_adapterhub_directories_in_safetensors_and_of_the_first_format_load(tmp_path):
    """save_adapter(..., use_safetensors=True) writes adapter.safetensors (adapters/utils.py, SAFE_WEIGHTS_NAME), which
    load_adapterhub did not look for (FileNotFoundError for pytorch_adapter.bin). AdapterHub's first files name the
    modules attention_text_task_adapters / layer_text_task_adapters and, without a "version" in adapter_config.json,
    mean the tanh approximation by "gelu"; AdapterHub's loader renames both, and load_adapterhub refused them."""
    from safetensors.torch import save_file

    state, config = adapterhub_tensors("bert")
    layer = "bert.encoder.layer.1"
    cases = {
        "safetensors": (state, {"config": {**config, "non_linearity": "gelu"}, "version": "adapters.1.2.0"}, "gelu"),
        "legacy": ({k.replace(".attention.output.adapters.", ".attention.output.attention_text_task_adapters.")
                    .replace(".output.adapters.", ".output.layer_text_task_adapters."): v for k, v in state.items()},
                   {"config": {**config, "non_linearity": "gelu"}, "name": "task"}, "gelu_tanh"),
    }
    for case, (tensors, meta, activation) in cases.items():
        path = tmp_path / case
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps(meta))
        if case == "safetensors":
            save_file(tensors, str(path / "adapter.safetensors"))
        else:
            torch.save(tensors, path / "pytorch_adapter.bin")
        torch.manual_seed(run_seed(0))
        model = tiny_bert().to(DEVICE)
        assert len(peftkern.load_adapterhub(model, str(path))) == 4, case
        found = adapters(model)
        for placement, site in (("after_attention", "attention.output"), ("after_feed_forward", "output")):
            adapter = found[f"{layer}.bottleneck_adapters.{placement}"]
            assert adapter.non_linearity == activation, case
            ah = f"{layer}.{site}.adapters.task."
            assert torch.equal(adapter.down.weight.cpu(), state[ah + "adapter_down.0.weight"]), case
            assert torch.equal(adapter.up.weight.cpu(), state[ah + "adapter_up.weight"]), case
