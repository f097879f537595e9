"""TEMPORARY (delete after merging branch `methods`): a stand-in for the data schema's
``Example`` and a minimal adapter for a tiny text-only causal LM, so the metrics can be
tested before unlearn_fast.data / unlearn_fast.models land.  Same collate format as the
contract: "<s>USER: {question} ASSISTANT: {answer}</s>", labels -100 except the answer
tokens and the closing </s>."""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

IGNORE_INDEX = -100


@dataclass
class Example:
    id: str
    concept: str
    question: str
    answer: str
    image: Optional[object] = None
    kind: str = "text"
    options: Tuple[str, ...] = ()
    answer_index: Optional[int] = None
    target_phrase: str = ""
    split: str = ""


class TextLMAdapter:
    def lm_head(self, model):
        return model.lm_head.weight, getattr(model.lm_head, "bias", None)

    def forward_kwargs(self, model, batch):
        return {k: batch[k] for k in ("input_ids", "attention_mask")}

    def hidden_states(self, model, batch):
        return model.model(**self.forward_kwargs(model, batch), use_cache=False).last_hidden_state

    def collate(self, examples, tokenizer, *, with_answer=True, padding_side="right"):
        enc = []
        for e in examples:
            ids = [tokenizer.bos_token_id] + tokenizer("USER: " + e.question + " ASSISTANT:",
                                                       add_special_tokens=False)["input_ids"]
            labels = [IGNORE_INDEX] * len(ids)
            if with_answer:
                a = tokenizer(" " + e.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                ids, labels = ids + a, labels + a
            enc.append((ids, labels))
        T = max(len(i) for i, _ in enc)
        B = len(enc)
        input_ids = torch.full((B, T), tokenizer.pad_token_id)
        attention = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX)
        for b, (ids, lab) in enumerate(enc):
            sl = slice(0, len(ids)) if padding_side == "right" else slice(T - len(ids), T)
            input_ids[b, sl] = torch.tensor(ids)
            attention[b, sl] = 1
            labels[b, sl] = torch.tensor(lab)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def build_tokenizer(texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = list(texts)
    tok.train_from_iterator(texts + [" " + t for t in texts], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
