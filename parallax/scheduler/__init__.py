"""The scheduler: node registry, layer allocation, request routing, HTTP app and cluster status."""
