"""The model side (torch): loading, sites, the named hook points, the unperturbed model and its
recordings, the perturbed passes, the screen's gradients, one head job."""
