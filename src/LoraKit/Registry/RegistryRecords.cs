namespace LoraKit.Registry;

/// <summary>One stored file of a version: its name in the adapter folder, its blob (sha256 of its bytes) and size.</summary>
public sealed record StoredFile(string File, string Blob, long Size);

/// <summary>
/// One registered version of a named adapter: its number (1, 2, … per name), its content hash
/// (<see cref="Lora.AdapterDigest"/>), when it was added, the note, the base it was trained on as LoraKit recorded it in the
/// safetensors metadata (null for PEFT's adapters), the config's <c>base_model_name_or_path</c>, the config JSON and its files.
/// </summary>
public sealed record AdapterVersion(string Name, int Version, string Sha256, string Created, string? Note,
    string? BaseFingerprint, string? BaseModelType, string? BaseModel, string Config, IReadOnlyList<StoredFile> Files)
{
    /// <summary>"NAME@VERSION".</summary>
    public string Ref => $"{Name}@{Version}";
}

/// <summary>
/// An evaluation report attached to a version: the report's blob, the base it was made on, and whether it holds a passed
/// gate for this version's content hash (<see cref="Evaluation.GateCheck"/>); <see cref="Detail"/> says why not.
/// </summary>
public sealed record EvalRecord(int Version, string Blob, string? BaseFingerprint, bool GatePassed, string Detail, string Added);

/// <summary>
/// One move of an alias, in order: <see cref="Action"/> is "promote" or "rollback"; <see cref="Previous"/> is the version the
/// alias left (null when it was new); <see cref="NoGate"/> records a promotion made without a passed gate.
/// </summary>
public sealed record AliasMove(long Id, string Alias, int Version, int? Previous, string Action, bool NoGate, string At);

/// <summary>Everything the registry holds about one name: versions, current aliases, alias history, evaluations and lineage.</summary>
public sealed record AdapterDetails(string Name, IReadOnlyList<AdapterVersion> Versions, IReadOnlyDictionary<string, int> Aliases,
    IReadOnlyList<AliasMove> History, IReadOnlyList<EvalRecord> Evals)
{
    /// <summary>The lineage of the versions that were added with the run that trained them, by version.</summary>
    public IReadOnlyList<Lineage> Lineage { get; init; } = [];
}
