"""ECAPA (speechbrain) and WavLM-SV (transformers) through the real loading paths, on tiny local
models saved in the released layouts; and every embedded encoder on real speakers."""
import numpy as np
import pytest
import torch

from eval.speaker import ECAPASpeaker, WavLMSpeaker, build_speaker_encoder

# The released speechbrain/spkrec-ecapa-voxceleb hyperparams.yaml, shrunk (channels 1024 -> 16,
# 192-d -> 16-d) and without the classifier the encoder does not use; the same keys otherwise.
ECAPA_YAML = """\
n_mels: 40
pretrained_path: speechbrain/spkrec-ecapa-voxceleb

compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>

mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False

embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [16, 16, 16, 16, 48]
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: 8
    lin_neurons: 16

modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
"""


@pytest.fixture(scope="module")
def tiny_ecapa(tmp_path_factory):
    from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN

    d = tmp_path_factory.mktemp("ecapa")
    (d / "hyperparams.yaml").write_text(ECAPA_YAML)
    torch.manual_seed(0)
    model = ECAPA_TDNN(40, channels=[16, 16, 16, 16, 48], attention_channels=8, lin_neurons=16)
    torch.save(model.state_dict(), d / "embedding_model.ckpt")
    return d, model.state_dict()


@pytest.fixture(scope="module")
def tiny_wavlm(tmp_path_factory):
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    d = tmp_path_factory.mktemp("wavlm") / "tiny-wavlm-sv"
    torch.manual_seed(0)
    cfg = WavLMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                      conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                      tdnn_dim=(32, 32, 32, 32, 64), xvector_output_dim=24, num_buckets=32, max_bucket_distance=64)
    WavLMForXVector(cfg).save_pretrained(d)
    # as microsoft/wavlm-base-plus-sv ships it
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=False,
                             return_attention_mask=True).save_pretrained(d)
    return d


def _speech_like(seed, n=16000):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    f0 = 100 + 60 * seed
    return (0.2 * np.sin(2 * np.pi * f0 * t) * (1 + np.sin(2 * np.pi * 4 * t)) +
            0.02 * rng.standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize("name", ["ecapa", "wavlm"])
def test_neural_encoder_loads_local_folder(name, tiny_ecapa, tiny_wavlm):
    model = str(tiny_ecapa[0]) if name == "ecapa" else str(tiny_wavlm)
    enc = build_speaker_encoder(name, model=model)
    dim = 16 if name == "ecapa" else 24
    wavs = [_speech_like(0), _speech_like(1, 24000), _speech_like(2, 8000), np.zeros(16000, np.float32)]
    emb = enc.embed(wavs)
    assert emb.shape == (4, dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb[:3], axis=1), 1.0, atol=1e-5)
    assert not emb[3].any()  # silence: zero row
    # batch_size 1: an embedding depends only on its own audio
    np.testing.assert_allclose(enc.embed([wavs[1]])[0], emb[1], atol=1e-5)
    # padded batches are close but not equal (the reason batch_size defaults to 1)
    enc.batch_size = 3
    assert float(enc.embed(wavs[:3])[2] @ emb[2]) > 0.9
    enc.batch_size = 1
    sim = enc.similarity(wavs[:3], [wavs[0]] * 3)
    assert sim.shape == (3,) and sim[0] == pytest.approx(1.0, abs=1e-5) and np.all(sim <= 1.0 + 1e-5)


def test_ecapa_weights_are_the_checkpoints(tiny_ecapa):
    d, state = tiny_ecapa
    enc = ECAPASpeaker(str(d))
    loaded = enc.model.mods.embedding_model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert {p.name for p in d.iterdir()} == {"hyperparams.yaml", "embedding_model.ckpt"}  # source untouched


def test_unreachable_models_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError, match="eval.speaker_model=DIR"):
        ECAPASpeaker("speechbrain/spkrec-ecapa-voxceleb")
    with pytest.raises(ValueError, match="huggingface-cli download microsoft/wavlm-base-plus-sv"):
        WavLMSpeaker("microsoft/wavlm-base-plus-sv")


@pytest.mark.parametrize("name", ["resemblyzer", "ecapa", "wavlm"])
def test_every_offline_encoder_separates_real_speakers(name, real_speech_dir):
    """Each encoder whose real weights are on this machine (resemblyzer ships them; ecapa/wavlm only
    if their default hub ids are cached) scores same-speaker pairs above different-speaker pairs."""
    import itertools
    import json

    from models.audio import load_audio

    try:
        enc = build_speaker_encoder(name)
    except ValueError as e:
        pytest.skip(f"{name}: real weights not available offline ({e})")
    rows = [json.loads(line) for line in (real_speech_dir / "manifest.jsonl").read_text().splitlines()]
    emb = enc.embed([load_audio(real_speech_dir / r["audio"], enc.sample_rate) for r in rows])
    sims = emb @ emb.T
    pairs = list(itertools.combinations(range(len(rows)), 2))
    same = [sims[i, j] for i, j in pairs if rows[i]["speaker"] == rows[j]["speaker"]]
    diff = [sims[i, j] for i, j in pairs if rows[i]["speaker"] != rows[j]["speaker"]]
    assert np.mean(same) > np.mean(diff)
    # every speaker is, on average, closer to itself than to each other speaker
    for spk in {r["speaker"] for r in rows}:
        mine = [i for i, r in enumerate(rows) if r["speaker"] == spk]
        own = np.mean([sims[i, j] for i, j in itertools.combinations(mine, 2)])
        for other in {r["speaker"] for r in rows} - {spk}:
            theirs = [i for i, r in enumerate(rows) if r["speaker"] == other]
            assert own > np.mean([sims[i, j] for i in mine for j in theirs])
