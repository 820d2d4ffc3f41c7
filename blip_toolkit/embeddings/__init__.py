"""Embedding shards: encoder adapters and the target head (`adapters`, `head`), the extraction job
(`extract`), the shard format (`format`), its writer and its one reader (`shards`), generated
features (`generated`) and the recall report of `eval-recall` (`recall_report`)."""
