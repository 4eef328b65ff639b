"""The small core that the tools and analysis_lib share: token shards, atomic files, source hashes, CLI conventions."""
