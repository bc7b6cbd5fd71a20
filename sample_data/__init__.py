"""The sample data shipped with edgepipe (see README.md here for provenance and licences); data only."""
