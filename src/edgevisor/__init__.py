"""edgevisor: self-hosted edge compute."""
