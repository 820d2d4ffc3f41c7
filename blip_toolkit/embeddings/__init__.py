"""Embedding shards: encoder adapters and the target head (`adapters`, `head`), the extraction job
(`extract`), the shard format (`format`), its writer (`shards`) and its one reader (`shard_reader`),
generated features (`generated`) and the recall report of `eval-recall` (`recall_report`, over
`recall_features`)."""
