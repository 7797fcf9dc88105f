"""Packed attention: per-sequence causal attention from boundaries, HF's sdpa without them."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening

from sloth_fx.batching.packed_attention import (NAME, install_packed_attention, packed_attention_forward,
                                      uninstall_packed_attention)
from sloth_fx.batching.padding_free import plan
from tiny_models import loss_and_grads, tiny_model, twin

FAMILIES = ["llama", "mistral"]  # mistral's tiny config has GQA (2 kv heads for 4 query heads)


class _Attention(torch.nn.Module):
    """What HF's attention modules give the interface function: GQA groups and causality."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("lengths", [[5, 1, 7, 3], [1], [4, 4], [1, 1, 1]])
@pytest.mark.parametrize("groups", [1, 2])
def test_function_is_per_sequence_sdpa(lengths: list[int], groups: int) -> None:
    """Each sequence alone through causal SDPA, in float64: the packed output, forward and backward."""
    gen = torch.Generator().manual_seed(len(lengths))
    t, h, d = sum(lengths), 4, 8
    q, k, v = (torch.randn(1, hh, t, d, generator=gen, dtype=torch.float64, requires_grad=True)
               for hh in (h, h // groups, h // groups))
    cu = _cu(lengths)
    out, _ = packed_attention_forward(_Attention(groups), q, k, v, None, scaling=0.3, cu_seq_lens_q=cu,
                                      cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    pieces = [F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b].repeat_interleave(groups, 1),
                                             v[:, :, a:b].repeat_interleave(groups, 1), is_causal=True, scale=0.3)
              for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    ref = torch.cat(pieces, dim=2).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def _sequences(vocab: int = 101, lengths: tuple[int, ...] = (6, 1, 9, 4)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_row_equals_separate_rows(family: str) -> None:
    """A row packed by DataCollatorWithFlattening (boundaries added by plan): its logits are the
    sequences' logits run one by one, and the gradient of any function of them is the same."""
    model = tiny_model(family, lora=True)
    separate = twin(model)
    assert install_packed_attention(model) is None
    sequences = _sequences()
    batch = DataCollatorWithFlattening()([{"input_ids": s} for s in sequences])
    p = plan({"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]})
    assert not isinstance(p, str) and p.kwargs["max_length_q"] == 9
    logits = p.restore(model(**p.kwargs)).logits
    ref = torch.cat([separate(input_ids=torch.tensor([s])).logits for s in sequences], dim=1)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    (logits * w).sum().backward()
    (ref * w).sum().backward()
    grads = dict(model.named_parameters())
    for name, param in separate.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(grads[name].grad, param.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_unpacked_calls_are_sdpa_bit_for_bit(family: str) -> None:
    """Without boundaries: padded, unpadded and packed-by-position_ids calls (HF's dense mask)
    give exactly what attn_implementation="sdpa" gives, loss and every gradient."""
    model = tiny_model(family, lora=True)
    sdpa = twin(model)
    assert install_packed_attention(model) is None
    ids = torch.randint(0, 101, (3, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    flat = DataCollatorWithFlattening()([{"input_ids": s} for s in _sequences()])
    for inputs in ({"input_ids": ids, "labels": ids},
                   {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)},
                   {"input_ids": flat["input_ids"], "position_ids": flat["position_ids"], "labels": flat["labels"]}):
        loss, grads = loss_and_grads(model, inputs)
        loss_ref, grads_ref = loss_and_grads(sdpa, inputs)
        assert torch.equal(loss, loss_ref)
        assert all(torch.equal(grads[n], grads_ref[n]) for n in grads_ref)


def test_boundaries_win_over_a_dense_mask() -> None:
    """A packed row called as the collator makes it (no mask: HF builds its dense packed mask)
    with boundaries gives the plan's call's numbers."""
    model = tiny_model("mistral", lora=True)
    assert install_packed_attention(model) is None
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": s} for s in _sequences()])
    p = plan({k: v for k, v in batch.items() if not k.startswith(("cu_", "max_"))})
    torch.testing.assert_close(model(**batch).loss, model(**p.kwargs).loss, rtol=1e-6, atol=1e-6)


def test_layer_compiles_without_graph_breaks() -> None:
    """A decoder layer with packed kwargs traces into one graph (fullgraph); new boundaries and a
    new max length recapture at most once, and the compiled layer matches the eager one."""
    model = tiny_model("mistral", lora=True)
    assert install_packed_attention(model) is None
    decoder = model.get_base_model().model
    layer = decoder.layers[0]
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    for lengths in ([6, 1, 9, 4], [3, 3, 2], [7, 5, 1, 2, 2], [8, 8]):
        p = plan({"input_ids": torch.zeros(1, sum(lengths), dtype=torch.long),
                  "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]})
        hidden = torch.randn(1, sum(lengths), 64)
        torch._dynamo.maybe_mark_dynamic(hidden, 1)
        kwargs = {k: p.kwargs[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
        position_ids = p.kwargs["position_ids"]
        embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)
        out = compiled(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=embeddings, **kwargs)
        ref = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=embeddings, **kwargs)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert counter.frame_count <= 2


def test_install_refuses_what_it_cannot_do_exactly() -> None:
    eager = tiny_model("llama")
    eager.set_attn_implementation("eager")
    assert "'eager', not 'sdpa'" in install_packed_attention(eager)
    windowed = tiny_model("mistral")
    windowed.config.sliding_window = 4
    assert "sliding-window" in install_packed_attention(windowed)
    softcapped = tiny_model("llama")
    softcapped.config.attn_logit_softcapping = 50.0
    assert "softcapping" in install_packed_attention(softcapped)
    assert "not a transformers model" in install_packed_attention(torch.nn.Linear(2, 2))
    for model in (eager, windowed, softcapped):
        assert model.config._attn_implementation != NAME


def test_uninstall_gives_the_original_back() -> None:
    model = tiny_model("llama", lora=True)
    assert install_packed_attention(model) is None
    assert install_packed_attention(model) is None  # idempotent
    assert model.get_base_model().config._attn_implementation == NAME
    uninstall_packed_attention(model)
    assert model.get_base_model().config._attn_implementation == "sdpa"
