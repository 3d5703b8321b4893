"""Text domains (offline, from package registries), deterministic splits and grain pipelines."""

from readme_jax.data.domains import (CHAT_DOMAIN, DOMAIN_NAMES, DOMAINS, PROVENANCE, DomainUnavailableWarning,
                                     PrepareReport, available_domains, cache_root, domain_meta, domain_table,
                                     load_domain, load_split, load_splits, prepare_domains, write_generated_domain)
from readme_jax.data.pipeline import (BlockSource, StratifiedMixMap, TokenizerLike, block_starts, domain_blocks,
                                      eval_batches, held_out_sample, mixture_batches, mixture_counts, token_stream,
                                      tokenizer_fingerprint)
from readme_jax.data.sources import Document
from readme_jax.data.splits import SPLITS, assign_groups, split_documents

__all__ = [
    "CHAT_DOMAIN", "DOMAIN_NAMES", "DOMAINS", "PROVENANCE", "SPLITS", "BlockSource", "Document", "DomainUnavailableWarning",
    "PrepareReport", "StratifiedMixMap", "TokenizerLike", "assign_groups", "available_domains", "block_starts", "cache_root",
    "domain_blocks", "domain_meta", "domain_table", "eval_batches", "held_out_sample", "load_domain",
    "load_split", "load_splits", "mixture_batches", "mixture_counts", "prepare_domains", "split_documents",
    "token_stream", "tokenizer_fingerprint", "write_generated_domain",
]
