"""The caption model's configuration: every hyper-parameter named once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class CaptionModelConfig:
    vocab_size: int
    max_caption_length: int  # tokens including <start> and <end>, derived from the train split
    feature_dim: int
    decoder: str = "merge"  # a name in the decoder registry (models.decoders): merge | inject | attention
    embedding_dim: int = 256
    units: int = 256
    dropout: float = 0.5
    cell: str = "lstm"  # lstm | gru
    freeze_embeddings: bool = False  # keep pretrained word vectors fixed during training
    # attention only: the encoder's spatial map (H, W, C), read from the store, and the weight of the
    # doubly stochastic regularisation (Show, Attend and Tell): each region attended about once per caption
    spatial_shape: tuple[int, int, int] | None = None
    attention_regularization: float = 1.0

    @property
    def reads_regions(self) -> bool:
        """True when the decoder reads spatial maps (H, W, C) instead of one pooled vector per image."""
        from models.decoders import get_decoder

        return get_decoder(self.decoder).reads_regions

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CaptionModelConfig:
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in data.items() if k in known})
        if config.spatial_shape is not None:  # a JSON list after a round trip through config.json
            config.spatial_shape = tuple(int(n) for n in config.spatial_shape)
        return config
