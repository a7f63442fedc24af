"""The caption model's configuration: every hyper-parameter named once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class CaptionModelConfig:
    vocab_size: int
    max_caption_length: int  # tokens including <start> and <end>, derived from the train split
    feature_dim: int
    decoder: str = "merge"  # merge | inject | attention
    embedding_dim: int = 256
    units: int = 256
    dropout: float = 0.5
    cell: str = "lstm"  # lstm | gru

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CaptionModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
