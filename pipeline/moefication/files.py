"""The names of the files MoEfication's stages write, for the code that writes them and the code
that reads them: importing a name runs none of the code that computes the files."""

HIDDEN = "hidden_states.h5"  # HiddenStates: each layer's fc_in inputs, and which tokens are held out
CLUSTERS = "clusters.safetensors"  # ExpertClusters: labels and centroids per layer
ROUTERS = "routers.safetensors"  # Routers: the two weights of each layer's router
