//! Build script. Without the `kld` feature (host builds) there is nothing to generate.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
