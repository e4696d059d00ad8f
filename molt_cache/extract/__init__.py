"""Stage one: dataset reader → frozen encoders → sharded Zarr cache. Resumable and rank-aware.

plan   (plan.py):    read every split's rows (ids and texts, never images), dedup texts and images,
                     tokenize, fix exact array shapes, compare with any cache already in `out_dir`,
                     check free disk.
units  (units.py):   work units = one shard of a modality's flat token arrays. A unit encodes every
                     item that overlaps its token rows (items straddling a shard boundary alone, as
                     a batch of one, so both neighbouring units compute identical bytes), writes its
                     whole shard and then an atomic completion record. A rerun skips recorded units;
                     units split across ranks are disjoint.
finish (finish.py):  rank 0 assembles the pooled arrays from the records and writes manifest.json last.
encode (encode.py):  the one path from images / texts to per-item, per-layer states, shared with
                     `molt predict`.
pipeline.py holds `extract()`, which runs the three in order and reports through callbacks.
"""
from molt_cache.extract.config import ExtractConfig, ExtractResult, extract_config_from_manifest
from molt_cache.extract.encode import (ALONE_BELOW_TOKENS, BLANK_IMAGE_KEY, BLANK_IMAGE_RGB, BLANK_IMAGE_SIZE,
                                       TEXT_BATCHING, EncodedBatch, ItemStates, encode_items, item_generator,
                                       load_image, text_batches)
from molt_cache.extract.pipeline import extract
from molt_cache.extract.plan import EXPECTED_ROOT_FILES, _resolve_device, open_encoders, tokenize_texts
from molt_cache.extract.units import _item_generator, _text_batches

__all__ = ["ALONE_BELOW_TOKENS", "BLANK_IMAGE_KEY", "BLANK_IMAGE_RGB", "BLANK_IMAGE_SIZE", "EXPECTED_ROOT_FILES",
           "TEXT_BATCHING", "EncodedBatch", "ExtractConfig", "ExtractResult", "ItemStates", "encode_items",
           "extract", "extract_config_from_manifest", "item_generator", "load_image", "open_encoders",
           "text_batches", "tokenize_texts", "_item_generator", "_resolve_device", "_text_batches"]
