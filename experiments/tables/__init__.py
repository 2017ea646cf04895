"""One-off result tables and checks: each script measures one comparison and writes results.json and table.md.
The flags and set-up they share are in `common`."""
