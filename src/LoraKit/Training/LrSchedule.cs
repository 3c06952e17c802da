namespace LoraKit.Training;

/// <summary>
/// Learning-rate multipliers as transformers' get_*_schedule_with_warmup: linear warm-up over the first steps, then
/// constant, linear decay to 0, or half-cosine to 0 at the last step. <c>step</c> counts optimizer steps already taken.
/// </summary>
public static class LrSchedule
{
    public static double Factor(string schedule, int step, int warmup, int total)
    {
        if (step < warmup) return (double)step / Math.Max(1, warmup);
        double progress = (double)(step - warmup) / Math.Max(1, total - warmup);
        return schedule switch
        {
            "constant" => 1.0,
            "linear" => Math.Max(0.0, (double)(total - step) / Math.Max(1, total - warmup)),
            "cosine" => Math.Max(0.0, 0.5 * (1.0 + Math.Cos(Math.PI * progress))),
            _ => throw new ArgumentException($"unknown schedule '{schedule}'"),
        };
    }
}
