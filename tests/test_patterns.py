"""The pattern engine and canonicalization, on small hand-written functions."""

import operator

import torch
import torch.fx as fx

from sloth_fx.rewrite.canonicalize import canonicalize_graph
from sloth_fx.rewrite.patterns import find_matches, trace_pattern


def scaled_square(x, w, eps, dtype):
    h = x.to(dtype)
    return w * (h.pow(2) + eps)


PATTERN = trace_pattern(scaled_square, ("eps", "dtype"))


def captured(fn) -> fx.Graph:
    graph = fx.symbolic_trace(fn).graph
    canonicalize_graph(graph)
    return graph


def test_canonical_spellings_are_one_form():
    def a(x):
        return x.pow(2) * 3

    def b(x):
        return operator.mul(torch.pow(x, 2), 3)

    targets = [[n.target for n in captured(f).nodes if n.op == "call_function"] for f in (a, b)]
    assert targets[0] == targets[1] == [torch.pow, torch.mul]


def test_matches_with_operands_swapped_and_binds_literals():
    def model(x, w):
        return (torch.pow(x.float(), 2) + 1e-5) * w

    (m,) = list(find_matches(captured(model), PATTERN))
    assert m.literals == {"eps": 1e-5, "dtype": torch.float32}
    assert {k: v.name for k, v in m.inputs.items()} == {"x": "x", "w": "w"}


def test_absent_cast_binds_dtype_to_none():
    def model(x, w):
        return w * (x.pow(2) + 0.5)

    (m,) = list(find_matches(captured(model), PATTERN))
    assert m.literals["dtype"] is None and m.literals["eps"] == 0.5


def test_different_structure_does_not_match():
    def model(x, w):
        return w * (x.pow(3) + 0.5)

    def other(x, w):
        return w + (x.pow(2) + 0.5)

    assert not list(find_matches(captured(model), PATTERN))
    assert not list(find_matches(captured(other), PATTERN))


def test_same_input_must_bind_consistently():
    def pattern(x):
        return x * x

    def model(a, b):
        return a * b, a * a

    matches = list(find_matches(captured(model), trace_pattern(pattern)))
    assert len(matches) == 1 and matches[0].inputs["x"].name == "a"


def test_intermediate_with_outside_user_is_reported():
    def model(x, w):
        sq = x.pow(2)
        return w * (sq + 1.0), sq

    (m,) = list(find_matches(captured(model), PATTERN))
    assert [n.name for n in m.outside_users()] == ["pow_1"]


def test_literal_must_not_bind_a_tensor():
    def model(x, w, e):
        return w * (x.pow(2) + e)

    assert not list(find_matches(captured(model), PATTERN))


def test_default_keyword_arguments_do_not_matter():
    def pattern(g, u):
        return torch.nn.functional.silu(g) * u

    def model(g, u):
        return u * torch.nn.functional.silu(g, inplace=False)

    assert len(list(find_matches(captured(model), trace_pattern(pattern)))) == 1


def test_slices_match_with_literal_bounds():
    def pattern(x, half):
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def model(x):
        return torch.cat((-x[..., 8:], x[..., :8]), dim=-1)

    def shifted(x):
        return torch.cat((-x[..., 4:], x[..., :8]), dim=-1)

    (m,) = list(find_matches(captured(model), trace_pattern(pattern, ("half",))))
    assert m.literals["half"] == 8
    assert not list(find_matches(captured(shifted), trace_pattern(pattern, ("half",))))
