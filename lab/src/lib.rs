//! nvmehp-lab (placeholder)
