"""The one dataset pipeline under `caption`, `vqa`, `retrieval` and `extract-embeddings`:

    sources -> ordered units (a tar, a parquet row group, an Arrow file, a slice of a file list)
        -> raw items of a unit in order -> decoded chunks in DataLoader workers -> a task
        -> a resumable sink per process (inference records, or embedding shards)

remote.py   local and remote paths (s3://, gs://, hf://, https://) through fsspec
tables.py   Parquet files and `datasets.save_to_disk` directories: units and rows
"""
