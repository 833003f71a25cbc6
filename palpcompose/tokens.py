"""The subjects' learned tokens: one new token per subject in every tokenizer and text encoder, its embedding
initialised from the subject's init word, and trained as its own small parameter (`PlaceholderEmbedding`).

Rendering uses the same functions to put trained embeddings back (`set_token_embeddings`). SDXL: each token lives
in both tokenizers and text encoders; its trained value is one row [CLIP-L | OpenCLIP-G] (docs/sdxl.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from palpcompose.errors import UserError, WeightsDoNotFit


def add_tokens(tokenizer, text_encoder, tokens: list[str]) -> dict[str, int]:
    """Each of `tokens` in the tokenizer (those it does not know yet are appended) and a text-encoder embedding table
    grown to match; the new rows are left for the caller to set. Returns {token: id}."""
    new = [t for t in tokens if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return {token: tokenizer.convert_tokens_to_ids(token) for token in tokens}


def add_placeholder_tokens(
    tokenizer, text_encoder, tokens: dict[str, str], init_words: dict[str, str]
) -> dict[str, int]:
    """Add one new token per subject and initialise its embedding from its init word.

    `tokens`: {"V1": "<name-v1>"}; `init_words`: {"V1": "cat"}. A word that the tokenizer splits into several
    tokens is initialised with the mean of their embeddings. Returns {"V1": token_id}.
    """
    for key, token in tokens.items():
        if token in tokenizer.get_vocab():
            raise UserError(f"subject {key}: the token {token!r} already exists in the base model's vocabulary")
    init_ids = {}
    for key, word in init_words.items():
        ids = tokenizer.encode(word, add_special_tokens=False)
        if not ids:
            raise UserError(f"subject {key}: init word {word!r} encodes to no token; set subjects.{key}.init_word")
        init_ids[key] = ids
    ids_of = add_tokens(tokenizer, text_encoder, list(tokens.values()))
    token_ids = {key: ids_of[token] for key, token in tokens.items()}
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for key, ids in init_ids.items():
            table[token_ids[key]] = table[ids].mean(dim=0)
    return token_ids


def set_token_embeddings(tokenizer, text_encoder, vectors: dict[str, torch.Tensor]) -> None:
    """Put trained embeddings back: each token of `vectors` (token -> (D,)) in the tokenizer, added if it is new, and
    its row of the text encoder's table set to its vector. Raises WeightsDoNotFit when a vector's width is not the
    table's (weights trained on another base model)."""
    ids = add_tokens(tokenizer, text_encoder, list(vectors))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for token, vector in vectors.items():
            if vector.numel() != table.shape[1]:
                raise WeightsDoNotFit(
                    f"the embedding of {token} has {vector.numel()} values but this base model's text encoder "
                    f"uses {table.shape[1]}; render with the base model it was trained on"
                )
            table[ids[token]] = vector.to(table)


class PlaceholderEmbedding(torch.nn.Module):
    """The text encoder's token-embedding table, frozen, with the subjects' rows trained as their own parameter
    `rows` (n, D) and spliced in at lookup: a position holding a placeholder id reads its trained row.

    Training the whole (V, D) table (49409 x 768 for SD-1.5) and masking its gradient would cost a dense gradient,
    dense AdamW moments (0.4 GiB) and a dense update every step for n useful rows; here the table is never written,
    so every other row stays bit-identical by construction. The placeholder ids are the table's last n rows
    (tokenizer.add_tokens appends them), in subject order.

    SDXL: one `rows` parameter (n, D1 + D2) holds each token's embedding in both encoders, [CLIP-L | OpenCLIP-G];
    each encoder's PlaceholderEmbedding reads its own `columns` of it (train_placeholder_rows_sdxl).
    """

    def __init__(self, table: torch.nn.Embedding, first_id: int, rows: torch.nn.Parameter | None = None,
                 columns: slice | None = None):
        super().__init__()
        self.table = table
        self.first_id = first_id
        self.rows = torch.nn.Parameter(table.weight[first_id:].detach().clone().float()) if rows is None else rows
        self.columns = columns  # None: all of `rows`

    def own_rows(self) -> torch.Tensor:
        return self.rows if self.columns is None else self.rows[:, self.columns]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.table(input_ids)
        row = input_ids - self.first_id  # >= 0 exactly at the placeholder positions
        spliced = F.embedding(row.clamp(min=0), self.own_rows()).to(embeds.dtype)
        return torch.where((row >= 0).unsqueeze(-1), spliced, embeds)

    def full_table(self) -> torch.Tensor:
        """The (V, D) table as the text encoder sees it: the frozen rows, then the trained placeholder rows."""
        return torch.cat([self.table.weight[: self.first_id], self.own_rows().to(self.table.weight.dtype)])


def train_placeholder_rows(text_encoder, token_ids: dict[str, int], rows: torch.nn.Parameter | None = None,
                           columns: slice | None = None) -> PlaceholderEmbedding:
    """Give the text encoder a PlaceholderEmbedding whose rows (in `token_ids` order) are the trainable tokens."""
    ids = list(token_ids.values())
    table = text_encoder.get_input_embeddings()
    if ids != list(range(table.num_embeddings - len(ids), table.num_embeddings)):
        raise ValueError(f"placeholder token ids {ids} must be the last rows of the embedding table, in order")
    module = PlaceholderEmbedding(table, ids[0], rows, columns)
    text_encoder.set_input_embeddings(module)
    return module


def add_trained_tokens(c, tokens: dict[str, str],
                       init_words: dict[str, str]) -> tuple[dict[str, int], PlaceholderEmbedding]:
    """Each subject's new token in every tokenizer and text encoder of `c` (models.Components), initialised from its
    init word in each; returns the first tokenizer's ids and the PlaceholderEmbedding whose `.rows` are the trained
    values. SDXL: `.rows` (n, D1 + D2) is shared by both encoders' PlaceholderEmbeddings, each reading its own
    columns; a flow family's the same over its encoders ([CLIP-L | T5] for Flux.1, [CLIP-L | CLIP-G | T5] for SD 3)."""
    pairs = list(zip(c.tokenizers, c.text_encoders, strict=True))
    ids = [add_placeholder_tokens(tok, enc, tokens, init_words) for tok, enc in pairs]
    if len(pairs) == 1:
        return ids[0], train_placeholder_rows(pairs[0][1], ids[0])
    tables = [enc.get_input_embeddings().weight for _, enc in pairs]
    first = [next(iter(i.values())) for i in ids]
    rows = torch.nn.Parameter(torch.cat([t[f:].detach() for t, f in zip(tables, first)], dim=1).float().clone())
    edges = [0, *torch.tensor([t.shape[1] for t in tables]).cumsum(0).tolist()]  # each encoder's columns
    embeddings = [train_placeholder_rows(enc, i, rows, slice(start, end))
                  for (_, enc), i, start, end in zip(pairs, ids, edges, edges[1:])]
    return ids[0], embeddings[0]
