"""Notebook 01's added exercise: the check passes the reference solution and names the usual
mistakes (each a small edit of the solution), with a hint and the seed that showed it."""

import pytest
import torch

from dsv3lite.exercises import ExerciseError
from dsv3lite.exercises.mla import check_absorbed_values
from dsv3lite.exercises.solutions import absorbed_values


def _fails(answer, match: str, seed: int = 0) -> ExerciseError:
    with pytest.raises(ExerciseError, match=match) as info:
        check_absorbed_values(answer, seed=seed)
    assert info.value.hint and f"seed={seed}" in str(info.value)
    return info.value


def test_solution_passes(capsys):
    for seed in (0, 1, 2, None):
        check_absorbed_values(absorbed_values, seed=seed)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and len(set(lines)) == 1 and lines[0].startswith("✓ correct")


def test_the_stub_is_not_done_yet(capsys):
    def my_absorbed_values(mla, probs, c_kv): ...

    check_absorbed_values(my_absorbed_values)
    assert "not done yet" in capsys.readouterr().out


def _w(mla):
    return mla.kv_b_proj.weight.view(mla.n_heads, mla.nope + mla.v_dim, mla.kv_lora_rank)


def test_w_uk_half_is_named():
    def wrong_half(mla, probs, c_kv):
        o_latent = torch.einsum("bhts,bsc->bthc", probs, c_kv)
        return torch.einsum("bthc,hdc->bthd", o_latent, _w(mla)[:, : mla.nope])

    _fails(wrong_half, "W\\^UK half")


def test_missing_w_uv_is_named():
    def no_w_uv(mla, probs, c_kv):
        return torch.einsum("bhts,bsc->bthc", probs, c_kv)

    _fails(no_w_uv, "still kv_lora_rank wide")


def test_head_major_layout_is_named():
    def head_major(mla, probs, c_kv):
        w = mla.kv_b_proj.weight.view(mla.nope + mla.v_dim, mla.n_heads, mla.kv_lora_rank)
        o_latent = torch.einsum("bhts,bsc->bthc", probs, c_kv)
        return torch.einsum("bthc,hdc->bthd", o_latent, w.transpose(0, 1)[:, mla.nope :])

    _fails(head_major, r"\[head, row within the head\]")


def test_any_other_error_gives_the_relative_error():
    def off(mla, probs, c_kv):
        return 1.1 * absorbed_values(mla, probs, c_kv)

    _fails(off, "relative error")
