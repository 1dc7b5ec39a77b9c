"""Evaluation by model recycling: fine-tune bases and a reference with the same recipe and seeds
(:mod:`.pipeline`, :mod:`.finetune`), keep the runs (:mod:`.results`), summarise paired
gains (:mod:`.summary`) and report them (:mod:`.report`).
"""
