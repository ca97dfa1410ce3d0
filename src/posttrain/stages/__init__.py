"""One module per stage, each readable top to bottom. Stages talk only through directories."""
