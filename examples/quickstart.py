"""napo_loss in a plain PyTorch loop: one packed forward per prompt, no full logits."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import napo_kernels as nk
from napo_kernels.recommender.data import RecPreferenceDataset, generate_world, train_bpe_tokenizer
from napo_kernels.recommender.packing import CandidateCollator, candidate_rows

torch.manual_seed(0)  # the model's initial weights and the loader's shuffling: the same run every time
world = generate_world(num_train=64, seed=0)  # synthetic users, items and 20-candidate lists
data = RecPreferenceDataset(world.train, num_negatives=3)  # positive + 3 sampled negatives
tok = train_bpe_tokenizer([data[i]["prompt"] for i in range(len(data))] + world.items, vocab_size=512)
config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2)
model = LlamaForCausalLM(config)  # a tiny Llama from a config: nothing is downloaded
collate = CandidateCollator(tok)  # prompt once + every candidate, 4-D attention mask
loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, collate_fn=collate)
criterion = nk.PreferenceLoss(method="napo", beta=1.0)  # keeps NAPO's margin EMA in its state_dict
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

for step, batch in enumerate(loader):
    hidden = candidate_rows(model, batch)  # [rows, H]: last hidden states of the scored tokens only
    b, c = batch["candidate_mask"].shape
    out = criterion(
        hidden, model.lm_head.weight, batch["score_labels"], sequence_ids=batch["score_sequence"],
        num_prompts=b, num_candidates=c, candidate_mask=batch["candidate_mask"],
    )  # fmt: skip
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step}: loss {out.loss.item():.4f}  reward accuracy {out.metrics['rewards/accuracies']:.2f}")
