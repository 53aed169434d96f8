"""csi_cloud: the service. Ingest, reconstruction, joint classification, API, datasets, training."""
