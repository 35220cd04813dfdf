"""features.logit_effects on a tiny random Llama (with and without its final RMSNorm) and GPT-2 base model
with tied embeddings: equal to the unembedding product by hand; non-causal models are refused."""
import pytest
import torch

from sae_fast import SparseAutoencoder, features

transformers = pytest.importorskip("transformers")


def tiny_llama_lm(tie: bool):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 2.0)  # a norm weight that changes the ranking
    return model


def test_logit_effects_match_the_unembedding_through_the_final_norm():
    model = tiny_llama_lm(tie=False)
    sae = SparseAutoencoder(16, 12, "topk", k=2, seed=0)
    with torch.no_grad():  # latent 2 writes token 17's (long) unembedding row over the norm weight: promotes it most
        model.lm_head.weight[17] *= 5
        sae.W_dec[2] = model.lm_head.weight[17] / model.model.norm.weight
    eff = features.logit_effects(model, sae, [2, 5, 0], k=4, scale=2.0)
    W_U, g = model.lm_head.weight.detach(), model.model.norm.weight.detach()
    for row, i in enumerate([2, 5, 0]):
        logits = W_U @ (g * sae.W_dec[i].detach() / 2.0)
        assert torch.equal(eff.promoted[row], torch.topk(logits, 4).indices)
        torch.testing.assert_close(eff.promoted_values[row], torch.topk(logits, 4).values)
        assert torch.equal(eff.suppressed[row], torch.topk(logits, 4, largest=False).indices)
    assert eff.final_norm and eff.promoted[0, 0] == 17
    raw = features.logit_effects(model, sae, [5], k=4, final_norm=False)
    assert not raw.final_norm
    assert torch.equal(raw.promoted[0], torch.topk(W_U @ sae.W_dec[5].detach(), 4).indices)
    assert "final norm applied" in eff.show(0) and "promotes" in eff.show(0)
    with pytest.raises(ValueError, match=r"latents must be integers in \[0, 12\)"):
        features.logit_effects(model, sae, [12])
    with pytest.raises(ValueError, match="unembedding reads width 16, the SAE writes 8"):
        features.logit_effects(model, SparseAutoencoder(8, 4, "topk", k=1), [0])


def test_logit_effects_on_a_tied_base_model_and_refusals():
    tied = tiny_llama_lm(tie=True)
    base = tied.model  # LlamaModel: no head, but tied to its embeddings
    base.config.architectures = ["LlamaForCausalLM"]
    W_U, norm = features.unembedding(base)
    assert W_U.data_ptr() == tied.lm_head.weight.data_ptr() and norm is base.norm
    untied = tiny_llama_lm(tie=False).model
    untied.config.architectures = ["LlamaForCausalLM"]
    with pytest.raises(ValueError, match="load the model with its head"):
        features.unembedding(untied)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match="logit effects need a causal LM"):
        features.unembedding(bert)
