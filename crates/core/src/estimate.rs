//! What running a job on one accelerator pool would take: data-transfer time
//! and cost over the routed path, run time at that accelerator's speed,
//! compute cost, energy and carbon; and the owner-weighted objective that
//! ranks pools against each other.
//!
//! All arithmetic is integer (seconds, fen, grams), widened to `u128`/`i128`
//! where products could overflow, and rounded up, so estimates are
//! reproducible bit for bit.

use serde::Serialize;

use crate::job::JobSpec;
use crate::topology::{AccelId, PoolId, SPEED_MILLI_REFERENCE, SiteId, Topology};

/// Grid emission factor: 0.5703 kg CO2 per kWh (MEE, China, 2022), in
/// tenths of a milligram per watt-hour. Green power counts as zero.
pub const GRID_CARBON_DECIMG_PER_WH: u128 = 5703;

/// The board power the carbon yardstick assumes for a reference accelerator.
pub const REFERENCE_POWER_W: u64 = 400;

/// Fixed-point scale of objective values: an objective of `OBJECTIVE_UNIT`
/// means "as good as the reference" on every weighted axis.
pub const OBJECTIVE_UNIT: u64 = 1_000_000;

/// The cost of running a job (or what remains of it) on one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Estimate {
    pub pool: PoolId,
    pub site: SiteId,
    pub accel: AccelId,
    pub gpus: u32,
    /// Predicted wait before accelerators are free (0 if they are free now).
    pub wait_s: u64,
    pub transfer_s: u64,
    pub transfer_mb: u64,
    pub transfer_cost_fen: i64,
    pub run_s: u64,
    pub compute_cost_fen: i64,
    pub energy_wh: u64,
    pub carbon_g: u64,
}

impl Estimate {
    /// Seconds from now until the job would finish: wait, stage data, run.
    pub fn completion_s(&self) -> u64 {
        self.wait_s + self.transfer_s + self.run_s
    }

    /// Seconds the accelerators are held once started: data staging happens
    /// on the allocation (the data lands on the site's scratch storage).
    pub fn occupancy_s(&self) -> u64 {
        self.transfer_s + self.run_s
    }

    pub fn total_cost_fen(&self) -> i64 {
        self.compute_cost_fen + self.transfer_cost_fen
    }
}

/// Seconds to do `reference_s` of reference-speed work at `speed_milli`, rounded up.
pub fn run_time_s(reference_s: u64, speed_milli: u32) -> u64 {
    (reference_s as u128 * SPEED_MILLI_REFERENCE as u128).div_ceil(speed_milli.max(1) as u128).max(1) as u64
}

/// Fen for `gpus` accelerators held `seconds` at `price_fen_per_hour`, rounded up.
pub fn compute_cost_fen(gpus: u32, seconds: u64, price_fen_per_hour: i64) -> i64 {
    (gpus as u128 * seconds as u128 * price_fen_per_hour.max(0) as u128).div_ceil(3600) as i64
}

/// Energy in watt-hours drawn by `gpus` accelerators at `power_w` for
/// `seconds`, including the facility overhead `pue_milli`.
pub fn energy_wh(gpus: u32, power_w: u32, seconds: u64, pue_milli: u32) -> u64 {
    (gpus as u128 * power_w as u128 * seconds as u128 * pue_milli as u128).div_ceil(3600 * 1000) as u64
}

/// Grams of CO2 for `energy_wh`, of which `green_bp` basis points are green.
pub fn carbon_g(energy_wh: u64, green_bp: u32) -> u64 {
    let brown_bp = 10_000u128.saturating_sub(green_bp as u128);
    (energy_wh as u128 * brown_bp * GRID_CARBON_DECIMG_PER_WH).div_ceil(10_000 * 10_000) as u64
}

/// Data the job must move to `site`, and the time and cost of moving it.
pub fn transfer_to(topology: &Topology, job: &JobSpec, site: SiteId) -> (u64, u64, i64) {
    let mut seconds = 0;
    let mut mb = 0;
    let mut fen = 0;
    for dataset in &job.datasets {
        if dataset.home == site {
            continue;
        }
        let route = topology.route(dataset.home, site);
        seconds += route.transfer_s(dataset.size_mb);
        mb += dataset.size_mb;
        fen += route.transfer_cost_fen(dataset.size_mb);
    }
    (seconds, mb, fen)
}

/// Estimates `reference_s` of the job's work on `pool`, with no wait.
pub fn estimate(topology: &Topology, job: &JobSpec, pool_id: PoolId, reference_s: u64) -> Estimate {
    let pool = topology.pool(pool_id);
    let site = topology.site(pool.site);
    let accel = topology.accelerator(pool.accel);
    let (transfer_s, transfer_mb, transfer_cost_fen) = transfer_to(topology, job, pool.site);
    let run_s = run_time_s(reference_s, pool.speed_milli);
    let energy = energy_wh(job.gpus, accel.power_w, run_s, site.pue_milli);
    Estimate {
        pool: pool_id,
        site: pool.site,
        accel: pool.accel,
        gpus: job.gpus,
        wait_s: 0,
        transfer_s,
        transfer_mb,
        transfer_cost_fen,
        run_s,
        compute_cost_fen: compute_cost_fen(job.gpus, run_s, pool.price_fen_per_hour),
        energy_wh: energy,
        carbon_g: carbon_g(energy, site.green_bp),
    }
}

/// The yardsticks that put time, money and carbon on one scale for a job:
/// its estimate at reference speed, at the network's median price, on the
/// plain grid at the reference board power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Yardstick {
    pub time_s: u64,
    pub cost_fen: i64,
    pub carbon_g: u64,
}

impl Yardstick {
    pub fn for_job(topology: &Topology, job: &JobSpec, reference_s: u64) -> Yardstick {
        let time_s = reference_s.max(1);
        let energy = energy_wh(job.gpus, REFERENCE_POWER_W as u32, time_s, 1000);
        Yardstick {
            time_s,
            cost_fen: compute_cost_fen(job.gpus, time_s, topology.reference_price_fen_per_hour()).max(1),
            carbon_g: carbon_g(energy, 0).max(1),
        }
    }
}

/// The owner-weighted objective of an estimate: lower is better;
/// `OBJECTIVE_UNIT` equals the yardstick on every axis.
pub fn objective(job: &JobSpec, yardstick: &Yardstick, e: &Estimate) -> u64 {
    let w = job.weights;
    let unit = OBJECTIVE_UNIT as u128;
    let time = w.time as u128 * e.completion_s() as u128 * unit / yardstick.time_s as u128;
    let cost = w.cost as u128 * e.total_cost_fen().max(0) as u128 * unit / yardstick.cost_fen as u128;
    let carbon = w.carbon as u128 * e.carbon_g as u128 * unit / yardstick.carbon_g as u128;
    ((time + cost + carbon) / w.total().max(1) as u128).min(u64::MAX as u128) as u64
}

/// How much `wait_s` of queueing adds to the objective of any estimate of this job.
pub fn objective_of_wait(job: &JobSpec, yardstick: &Yardstick, wait_s: u64) -> u64 {
    let w = job.weights;
    (w.time as u128 * wait_s as u128 * OBJECTIVE_UNIT as u128 / yardstick.time_s as u128 / w.total().max(1) as u128)
        .min(u64::MAX as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carbon_counts_only_brown_power() {
        // 8 GPUs x 400 W x 1 h x PUE 1.25 = 4,000 Wh; half green -> 2 kWh x 0.5703 kg.
        let wh = energy_wh(8, 400, 3600, 1250);
        assert_eq!(wh, 4000);
        assert_eq!(carbon_g(wh, 5000), 1141); // 1140.6 g rounded up
        assert_eq!(carbon_g(wh, 10_000), 0);
    }

    #[test]
    fn run_time_scales_with_speed_and_rounds_up() {
        assert_eq!(run_time_s(3600, 1000), 3600);
        assert_eq!(run_time_s(3600, 3170), 1136);
        assert_eq!(run_time_s(1, 3170), 1);
        assert_eq!(compute_cost_fen(4, 1800, 1000), 2000);
        assert_eq!(compute_cost_fen(1, 1, 1000), 1);
    }
}
