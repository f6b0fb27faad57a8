"""The papers' text experiment: DistilBERT on Rotten Tomatoes, attacked by PSO and IGA.

- `data`: Rotten Tomatoes from staged files (the rt-polaritydata release or HF split exports),
  tokenization into packed [N, 2, L] id/mask tensors, a seeded loader, a tiny generated look-alike.
- `model`: the staged `distilbert-base-uncased` directory (checked, loaded offline), the
  TextClassifier wrapper that samat's methods step, a tiny random DistilBERT writer, and the
  victim (`predict_proba`) the attacks query.
- `resources`: counter-fitted embeddings and HowNet sememe substitutes (staged files), the stop
  words; `iga` and `pso`: the two attacks (TextAttack's IGAWang2019 and PSOZang2020 recipes);
  `attack`: their shared query, result and summary code.
- `optim`: AdamW with a linear schedule.

Nothing here imports transformers until a model is loaded or written.
"""

from samat.text.attack import AttackResult, AttackSummary, attack_dataset, summarize
from samat.text.data import (
    TextDataset,
    TextSplit,
    TokenizedSplit,
    TokenLoader,
    encode,
    generate_rotten_tomatoes,
    load_rotten_tomatoes,
    tiny_vocabulary,
    tokenize_split,
)
from samat.text.iga import IGA, IGAConfig
from samat.text.model import (
    TextClassifier,
    TextVictim,
    check_model_dir,
    load_pretrained,
    load_tokenizer,
    require_model_dir,
    write_tiny_model,
)
from samat.text.optim import linear_schedule, make_adamw
from samat.text.pso import PSO, PSOConfig
from samat.text.resources import (
    STOPWORDS,
    EmbeddingSynonyms,
    SememeSynonyms,
    WordEmbedding,
    convert_textattack_hownet,
    export_hownet_candidates,
    load_counterfitted,
    load_hownet_candidates,
    write_tiny_resources,
)

__all__ = [
    "IGA",
    "PSO",
    "STOPWORDS",
    "AttackResult",
    "AttackSummary",
    "EmbeddingSynonyms",
    "IGAConfig",
    "PSOConfig",
    "SememeSynonyms",
    "TextClassifier",
    "TextDataset",
    "TextSplit",
    "TextVictim",
    "TokenLoader",
    "TokenizedSplit",
    "WordEmbedding",
    "attack_dataset",
    "check_model_dir",
    "convert_textattack_hownet",
    "encode",
    "export_hownet_candidates",
    "generate_rotten_tomatoes",
    "linear_schedule",
    "load_counterfitted",
    "load_hownet_candidates",
    "load_pretrained",
    "load_rotten_tomatoes",
    "load_tokenizer",
    "make_adamw",
    "require_model_dir",
    "summarize",
    "tiny_vocabulary",
    "tokenize_split",
    "write_tiny_model",
    "write_tiny_resources",
]
