//! pci(4)'s loader tunables for message interrupts: `hw.pci.enable_msix` and
//! `hw.pci.enable_msi`.
//!
//! sys/dev/pci/pci.c reads them at boot (`TUNABLE_INT` into `pci_do_msix` and `pci_do_msi`,
//! both 1 by default), long before any module loads. With one of them 0, pci(4) behaves as if
//! no function had that capability:
//! - `pci_msix_count_method` / `pci_msi_count_method` return 0,
//! - `pci_msix_table_bar_method` / `pci_msix_pba_bar_method` return -1,
//! - `pci_alloc_msix_method` / `pci_alloc_msi_method` return ENODEV (their "capability
//!   present?" test, after the EINVAL, rid-0 and already-allocated checks).
//!
//! A driver that follows nvme(4)'s order (MSI-X, else MSI, else INTx) then takes the legacy
//! line by itself, which is how `kldhost run --qemu --tunable hw.pci.enable_msix=0 --tunable
//! hw.pci.enable_msi=0` gets the module onto INTx ([`super::intx`]). The values are read from
//! the kernel environment once per run, before the module is loaded ([`load`]); like
//! pci.c's, a value that is not a number leaves the default.

use std::sync::atomic::{AtomicBool, Ordering};

/// The tunables that leave a function only its INTx line (for `kldhost scenario` with
/// `interrupts = "intx"`: pass them as loader tunables, e.g. append them to
/// [`super::run::Options::tunables`], or give them to [`load`] before the module loads).
pub const INTX_ONLY_TUNABLES: [(&str, &str); 2] = [("hw.pci.enable_msix", "0"), ("hw.pci.enable_msi", "0")];

/// [`INTX_ONLY_TUNABLES`] as kernel-environment pairs, the form [`load`] and
/// `Options::tunables` take.
pub fn intx_only() -> Vec<(String, String)> {
    INTX_ONLY_TUNABLES.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
}

/// `pci_do_msix` and `pci_do_msi` (pci.c): 1 unless the kernel environment says otherwise.
static DO_MSIX: AtomicBool = AtomicBool::new(true);
static DO_MSI: AtomicBool = AtomicBool::new(true);

/// Boot: pci.c's `TUNABLE_INT("hw.pci.enable_msix", ...)` and `("hw.pci.enable_msi", ...)`
/// from the kernel environment `kenv` (name, value). Names pci(4) does not know are ignored
/// here (they are the module's, applied when its sysctls register).
pub fn load(kenv: &[(String, String)]) {
    let value = |name: &str| kenv.iter().rev().find(|(n, _)| n == name).and_then(|(_, v)| parse_int(v));
    let msix = value("hw.pci.enable_msix").is_none_or(|v| v != 0);
    let msi = value("hw.pci.enable_msi").is_none_or(|v| v != 0);
    DO_MSIX.store(msix, Ordering::Relaxed);
    DO_MSI.store(msi, Ordering::Relaxed);
    if !msix || !msi {
        super::log(format!("pci: hw.pci.enable_msix={} hw.pci.enable_msi={} (loader tunables)", u8::from(msix), u8::from(msi)));
    }
}

/// getenv_int's parse (decimal, or hex with 0x).
fn parse_int(v: &str) -> Option<i64> {
    match v.strip_prefix("0x") {
        Some(h) => i64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// `pci_do_msix`.
pub fn msix_enabled() -> bool {
    DO_MSIX.load(Ordering::Relaxed)
}

/// `pci_do_msi`.
pub fn msi_enabled() -> bool {
    DO_MSI.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kenv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    #[test]
    fn zero_disables_and_anything_else_keeps_the_default() {
        load(&intx_only());
        assert!(!msix_enabled() && !msi_enabled());
        load(&kenv(&[("hw.pci.enable_msix", "0"), ("hw.pci.enable_msi", "1")]));
        assert!(!msix_enabled() && msi_enabled());
        // Not a number: pci.c's variable keeps its default (1).
        load(&kenv(&[("hw.pci.enable_msix", "no"), ("hw.nvme_hotplug.claim", "1")]));
        assert!(msix_enabled() && msi_enabled());
        load(&[]);
        assert!(msix_enabled() && msi_enabled());
    }
}
