"""``load_model`` and the one classifier-free-guidance adapter, on the embedded models (CPU, no download)."""

import pytest
import torch

from diffalign.models import EMBEDDED, load_model
from diffalign.models.adapters import GuidedUNet
from diffalign.models.gmm import GMM_SCHEDULER_DIR

TOL = 1e-5  # float32 UNet outputs of the same inputs in batches of 24 vs 12 (other summation order): 1.1e-6 seen


def test_gmm_spec_is_the_exact_mixture():
    spec = load_model("gmm")
    assert spec.sample_shape == (1, 8, 8) and spec.dtype == torch.float64 and spec.guided is None
    assert spec.scheduler_dir == GMM_SCHEDULER_DIR and spec.scheduler_config["prediction_type"] == "epsilon"
    assert spec.fingerprint.startswith("GaussianMixture:sha256:")
    data = spec.data()
    assert data.shape == (8192, 1, 8, 8) and torch.equal(data, spec.data())  # seeded draws
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert spec.model(x, 500).dtype == torch.float64  # exact eps, kept in float64
    assert spec.with_guidance(1.0) is spec.model
    with pytest.raises(ValueError, match="unconditional: use guidance_scale 1.0"):
        spec.with_guidance(2.0)
    with pytest.raises(ValueError, match="'gmm' model has no attention"):
        load_model("gmm", attention="sdpa")


def test_digits_cond_guidance_cycles_the_digits_and_matches_the_formula():
    spec = load_model("digits-cond", guidance_scale=2.0)
    assert set(EMBEDDED) == {"gmm", "digits", "digits-cond"} and spec.sample_shape == (1, 8, 8)
    unet = spec.network
    x = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(12) % 10  # the batch cycles through the digits
    with torch.no_grad():
        guided = spec.model(x, 400)
        table = spec.guided(2.0).embeds  # (20, 1, D): ten empty prompts, then the digits 0..9
        eps_u = unet(x, 400, encoder_hidden_states=table[:10][labels]).sample
        eps_c = unet(x, 400, encoder_hidden_states=table[10:][labels]).sample
        assert (guided - (eps_u + 2.0 * (eps_c - eps_u))).abs().max() <= TOL
        # the same conditioning given per call (AdjointDPM's layout) gives the same output
        per_call = GuidedUNet(unet, guidance_scale=2.0)(x, 400, torch.cat([table[:10][labels], table[10:][labels]]))
        assert (per_call - guided).abs().max() <= TOL
        sevens = load_model("digits-cond", prompts=["seven"], guidance_scale=1.0)
        seven = sevens.guided(1.0).embeds  # (2, 1, D): the empty prompt, then "seven"
        assert seven.shape[0] == 2 and torch.equal(seven[0], table[0]) and torch.equal(seven[1], table[10 + 7])
        conditional = unet(x, 400, encoder_hidden_states=table[10 + 7].expand(12, -1, -1)).sample
        assert (sevens.model(x, 400) - conditional).abs().max() <= TOL  # scale 1: the conditional model alone


def test_guided_unet_checks_the_conditioning_layout():
    spec = load_model("digits-cond")
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="expected 4 rows for 2 samples, got 2"):
        GuidedUNet(spec.network, guidance_scale=2.0)(x, 10, torch.zeros(2, 1, 32))
    with pytest.raises(ValueError, match="need a guidance_scale"):
        GuidedUNet(spec.network, embeds=torch.zeros(2, 1, 32))


def test_digits_cond_ems_data_match_the_prompt_of_each_batch_row():
    """Row k of digits-cond's data is of the class its fixed conditioning names (prompt k % P): the pairs EMS is an
    expectation over. The classifier agrees with the labels it was given on >= 95% of the rows."""
    from diffalign.models.digits import load_digits_classifier

    classifier = load_digits_classifier()
    for prompts, classes in ((None, list(range(10))), (["a handwritten 3", "a handwritten 7"], [3, 7])):
        spec = load_model("digits-cond", prompts=prompts)
        data = spec.data()  # (n P, 1, 8, 8)
        assert spec.period == len(classes) and data.shape[0] % spec.period == 0
        expected = torch.tensor(classes).repeat(data.shape[0] // len(classes))  # (n P,)
        with torch.no_grad():
            predicted = classifier(data).argmax(-1)
        assert (predicted == expected).float().mean() > 0.95
    with pytest.raises(ValueError, match="must name digits"):
        load_model("digits-cond", prompts=[""]).data()
