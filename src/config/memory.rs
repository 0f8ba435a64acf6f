//! `--model_memory_budget=DEVICE=SIZE[,DEVICE=SIZE]`: the most bytes resident models may
//! hold on each device. Parsed here; the registry enforces it.

use std::fmt;
use std::str::FromStr;

/// Bytes per device (`cpu`, `cuda:N`); a device not named has no budget.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryBudget {
    /// (device as `cpu` / `cuda:N`, bytes), each device once.
    pub devices: Vec<(String, u64)>,
}

impl MemoryBudget {
    /// The budget of `device` (named as `cpu` or `cuda:N`), if it has one.
    pub fn of(&self, device: &str) -> Option<u64> {
        self.devices
            .iter()
            .find(|(name, _)| name == device)
            .map(|&(_, bytes)| bytes)
    }
}

impl FromStr for MemoryBudget {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut devices: Vec<(String, u64)> = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (device, size) = entry
                .split_once('=')
                .ok_or_else(|| format!("'{entry}' is not DEVICE=SIZE (e.g. cpu=4GiB)"))?;
            let device = device.trim();
            let valid = device == "cpu"
                || device
                    .strip_prefix("cuda:")
                    .is_some_and(|n| n.parse::<usize>().is_ok());
            if !valid {
                return Err(format!("'{device}' is not a device: use cpu or cuda:N"));
            }
            if devices.iter().any(|(name, _)| name == device) {
                return Err(format!("device '{device}' is given more than once"));
            }
            let bytes = parse_size(size.trim())?;
            if bytes == 0 {
                return Err(format!("the budget of '{device}' is 0 bytes"));
            }
            devices.push((device.to_string(), bytes));
        }
        Ok(MemoryBudget { devices })
    }
}

impl fmt::Display for MemoryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries: Vec<String> = self
            .devices
            .iter()
            .map(|(device, bytes)| format!("{device}={bytes}"))
            .collect();
        f.write_str(&entries.join(","))
    }
}

/// A size in bytes: a number, optionally fractional, with an optional unit: B, KiB, MiB,
/// GiB, TiB (powers of 1024) or kB/KB, MB, GB, TB (powers of 1000).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "'{text}': unknown unit '{other}' (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size (e.g. 512MiB)"))?;
    let bytes = (value * multiplier as f64).round();
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("'{text}' is too large"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_and_without_units() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn budgets_per_device() {
        let budget: MemoryBudget = "cpu=4GiB, cuda:1=70GiB".parse().unwrap();
        assert_eq!(budget.of("cpu"), Some(4 << 30));
        assert_eq!(budget.of("cuda:1"), Some(70 << 30));
        assert_eq!(budget.of("cuda:0"), None);
        assert_eq!("".parse::<MemoryBudget>().unwrap(), MemoryBudget::default());
        for bad in [
            "gpu=1GiB",
            "cpu",
            "cpu=0",
            "cpu=1GiB,cpu=2GiB",
            "cuda:x=1GiB",
        ] {
            assert!(bad.parse::<MemoryBudget>().is_err(), "{bad}");
        }
    }
}
