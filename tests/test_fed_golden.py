"""FED components against golden vectors produced by the official code (tests/data/fed_*.pt).

Tolerances follow tests/data README (shared/golden/README.md): a few times the measured
float32-vs-float64 drift of the official code on the same inputs.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from occreid.data.npo import official_stripe_rule, stripe_mask, stripe_means
from occreid.losses.fed_losses import memory_contrastive_loss
from occreid.methods.fed.model import FDM, FED, OEM, convert_official_state_dict, memory_search
from occreid.models.heads import BNNeck
from occreid.methods.fed.memory import IdentityMemory

DATA = Path(__file__).parent / "data"


def load(name: str) -> dict:
    return torch.load(DATA / name, weights_only=True)


def sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------ mask rule
def test_mask_rule_golden():
    g = load("fed_mask_rule.pt")
    means = stripe_means(g["in.diff_map"], 4)
    assert torch.equal(means[:12], g["out.stripe_means"][:12])  # dyadic rows: exact
    torch.testing.assert_close(means[12:], g["out.stripe_means"][12:], rtol=0, atol=1e-6)
    assert torch.equal(official_stripe_rule(g["out.stripe_means"]), g["out.mask"])
    mask = stripe_mask(g["in.diff_map"], 4, rule="official")
    assert mask.dtype == torch.float32
    assert torch.equal(mask, g["out.mask"])
    # batched == one image at a time (the data pipeline may call it per sample)
    per_image = torch.stack([stripe_mask(d, 4) for d in g["in.diff_map"]])
    assert torch.equal(per_image, mask)


def test_mask_rule_paper_variant_on_golden_maps():
    g = load("fed_mask_rule.pt")
    paper = stripe_mask(g["in.diff_map"], 4, rule="paper")
    # Reference: fraction of changed pixels per 64-row stripe > 3/4 -> occluded.
    cov = (g["in.diff_map"] > 0).float().view(15, 4, 64 * 128).mean(-1)
    assert torch.equal(paper, (cov <= 0.75).float())
    # Row 4 (bottom patch of 100 rows): official labels 2 stripes, the paper only the full one.
    assert g["out.mask"][4].tolist() == [1, 1, 0, 0]
    assert paper[4].tolist() == [1, 1, 1, 0]
    # Row 8 (vertical occluder): all visible under both rules.
    assert paper[8].tolist() == [1, 1, 1, 1] == g["out.mask"][8].tolist()


# ------------------------------------------------------------------------------ OEM
def _oem_modules(g):
    sd = convert_official_state_dict(sub(g, "param."))
    oem, bn = OEM(768, 4), BNNeck(4 * 768)
    oem.load_state_dict(sub(sd, "oem."))
    bn.load_state_dict(sub(sd, "part_bn."))
    return oem, bn.eval()


def test_oem_golden():
    g = load("fed_oem.pt")
    oem, bn = _oem_modules(g)
    with torch.no_grad():
        erased, scores = oem(g["in.parts"])
        x_bn = bn(erased.flatten(1))
    torch.testing.assert_close(scores, g["out.scores"], rtol=0, atol=1e-6)
    torch.testing.assert_close(erased, g["out.erased"], rtol=0, atol=4e-6)
    torch.testing.assert_close(x_bn, g["out.x_bn_eval"], rtol=0, atol=5e-6)


class _TokenStub(nn.Module):
    """A 'backbone' returning fixed tokens: patch grid 4x1 whose rows are the given parts."""

    def __init__(self, parts: torch.Tensor) -> None:
        super().__init__()
        self.embed_dim = parts.shape[-1]
        self.grid_size = (parts.shape[1], 1)
        self.num_cameras = 0
        self.parts = parts

    def forward(self, images, cam_ids=None):
        cls = torch.zeros(self.parts.shape[0], 1, self.embed_dim)
        return torch.cat([cls, self.parts], dim=1)


def test_fed_model_eval_feature_golden():
    """The full FED eval path (part pooling -> OEM -> BNNeck) gives the official x1_bn."""
    g = load("fed_oem.pt")
    model = FED(_TokenStub(g["in.parts"]), num_classes=10)
    missing, unexpected = model.load_state_dict(convert_official_state_dict(sub(g, "param.")), strict=False)
    assert not unexpected
    assert all(not k.startswith(("oem.", "part_bn.")) for k in missing)
    model.eval()
    with torch.no_grad():
        out = model.forward_features(torch.zeros(3, 3, 8, 8))
    torch.testing.assert_close(out["feat"], g["out.x_bn_eval"], rtol=0, atol=5e-6)
    torch.testing.assert_close(out["part_scores"], g["out.scores"], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ memory search
def test_memory_search_golden():
    g = load("fed_memory_search.pt")
    mem = F.normalize(g["in.memory"], dim=1)
    k = int(g["meta.k"]) - 1  # official top-9 -> K = 8
    lat_t, idx_t = memory_search(g["in.x"], mem, k, g["in.labels"])
    lat_e, idx_e = memory_search(g["in.x"], mem, k, None)
    assert torch.equal(idx_t, g["out.index_train"])
    assert torch.equal(idx_e, g["out.index_eval"])
    torch.testing.assert_close(lat_t, g["out.latents_train"], rtol=0, atol=1e-7)
    torch.testing.assert_close(lat_e, g["out.latents_eval"], rtol=0, atol=1e-7)
    assert not (idx_t == g["in.labels"][:, None]).any()


# ------------------------------------------------------------------------------ FDM
@pytest.fixture(scope="module")
def fdm_golden():
    """The golden file and one FDM (768-d, built once: it has 51 M parameters) loaded from it."""
    g = load("fed_fdm.pt")
    fdm = FDM(768, 4, 8)
    fdm.load_state_dict(sub(convert_official_state_dict(sub(g, "param.")), "fdm."))
    return g, fdm


def test_fdm_golden_official_path(fdm_golden):
    g, fdm = fdm_golden
    assert fdm.attn.head_merge == "official"
    with torch.no_grad():
        out, inter = fdm(g["in.x_bn"], g["in.latents"], g["in.scores"], return_intermediates=True)
    torch.testing.assert_close(inter["attn"], g["out.attn"], rtol=0, atol=2e-6)
    torch.testing.assert_close(inter["ffn1"], g["out.ffn2"], rtol=0, atol=2e-5)
    torch.testing.assert_close(out, g["out.diffused"], rtol=0, atol=2e-5)


def test_fdm_golden_fixed_path_side_by_side(fdm_golden):
    """The official head merge mixes samples of the batch (a .transpose on a 5-D tensor).

    The per-sample path (the paper's Eq. 4-6) equals the official one run on each sample
    alone (for a batch of one there is nothing to mix) and differs from the batched official
    output.
    """
    g, official = fdm_golden
    fixed = copy.deepcopy(official)
    fixed.attn.head_merge = "per_sample"
    x, lat, s = g["in.x_bn"], g["in.latents"], g["in.scores"]
    with torch.no_grad():
        fixed_out = fixed(x, lat, s)
        one_by_one = torch.cat([official(x[i : i + 1], lat[i : i + 1], s[i : i + 1]) for i in range(3)])
        official_out = official(x, lat, s)
    torch.testing.assert_close(fixed_out, one_by_one, rtol=0, atol=2e-5)
    assert (fixed_out - g["out.diffused"]).abs().max() > 0.1
    torch.testing.assert_close(official_out, g["out.diffused"], rtol=0, atol=2e-5)
    # Plain reference of the official merge: chunk c of sample b holds head (bH + c) // B
    # of sample (bH + c) % B.
    with torch.no_grad():
        B, H, dh = 3, 8, 384
        q = fixed.attn.q(x).view(B, H, dh)
        k, v = fixed.attn.kv(lat).view(B, 8, 2, H, dh).unbind(2)
        a = (torch.einsum("bhd,bkhd->bhk", q, k) * 96**-0.5).softmax(-1)
        o = torch.einsum("bhk,bkhd->bhd", a, v)  # per-sample heads [B, H, dh]
        mixed = torch.stack(
            [torch.cat([o[(b * H + c) % B, (b * H + c) // B] for c in range(H)]) for b in range(B)]
        )
        ref = fixed.attn.proj(mixed).view(B, 4, 768)
    torch.testing.assert_close(ref, g["out.attn"], rtol=0, atol=2e-6)


# ------------------------------------------------------------------------------ losses / memory
def test_memory_loss_and_gradient_golden():
    g = load("fed_losses.pt")
    x = g["in.x"].clone().requires_grad_(True)
    loss = memory_contrastive_loss(x, g["in.labels"], g["in.memory"], float(g["meta.temp"]))
    loss.backward()
    torch.testing.assert_close(loss.detach(), g["out.loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad, g["out.grad_x"], rtol=0, atol=1e-8)
    occ = memory_contrastive_loss(g["in.x_occ"], g["in.labels"], g["in.memory"], 0.05)
    torch.testing.assert_close(occ, g["out.loss_occ_momentum1"], rtol=1e-5, atol=0)
    torch.testing.assert_close(g["out.infonce_loss"], g["out.loss"], rtol=0, atol=0)


def test_memory_update_golden():
    g = load("fed_losses.pt")
    # The official per-sample loop, step by step, reproduces the stored bank bit for bit ...
    ref = g["in.memory"].clone()
    for xi, y in zip(g["in.x"], g["in.labels"]):
        ref[y] = 0.2 * ref[y] + 0.8 * xi
    assert torch.equal(ref, g["out.memory_after"])
    # ... and occreid's closed form agrees up to float32 rounding.
    mem = IdentityMemory(10, 3072, momentum=float(g["meta.momentum"]))
    mem.features.copy_(g["in.memory"])
    mem.update(g["in.x"], g["in.labels"])
    torch.testing.assert_close(mem.features, g["out.memory_after"], rtol=0, atol=1e-6)
    # Centre 3 has samples 0, 2, 4, 7: weights 0.0016 c + 0.0064, 0.032, 0.16, 0.8.
    x = g["in.x"].double()
    c3 = 0.0016 * g["in.memory"][3].double() + 0.0064 * x[0] + 0.032 * x[2] + 0.16 * x[4] + 0.8 * x[7]
    torch.testing.assert_close(mem.features[3].double(), c3, rtol=0, atol=1e-5)
    # Occluded branch (self_momentum = 1): exact no-op.
    occ = IdentityMemory(10, 3072)
    occ.features.copy_(g["in.memory"])
    occ.update(g["in.x_occ"], g["in.labels"], momentum=1.0)
    assert torch.equal(occ.features, g["out.memory_after_occ_momentum1"])


def test_golden_files_are_the_shared_ones():
    """The copies under tests/data hold the keys the tests rely on."""
    for name, key in [
        ("fed_mask_rule.pt", "out.mask"),
        ("fed_oem.pt", "out.x_bn_eval"),
        ("fed_memory_search.pt", "out.index_train"),
        ("fed_fdm.pt", "out.diffused"),
        ("fed_losses.pt", "out.memory_after"),
    ]:
        assert key in load(name)


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
