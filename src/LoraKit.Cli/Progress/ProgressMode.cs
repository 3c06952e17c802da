namespace LoraKit.Cli.Progress;

/// <summary>How a piece of long work shows its progress.</summary>
public enum ProgressMode
{
    /// <summary>A bar when stderr is a terminal, plain lines when it is redirected.</summary>
    Auto,
    /// <summary>A live Spectre.Console bar (description, bar, percentage, remaining time).</summary>
    Bar,
    /// <summary>Plain lines, one per tenth of the work and one at the end: logs and pipes read them as they are.</summary>
    Lines,
    /// <summary>Nothing (e.g. under <c>--json</c>, where stderr should carry only errors).</summary>
    Off,
}
